"""The logged rollouts of runs judged again with this checkout's verifier and verdict: how the
labels of their claims move (rule 8 counts the claims an earlier version paid +1 that it does not).

    python bench/rejudge.py bench/results/v6/*-s?

Each step logs one response (balto.py section 10) with the labels its run gave. This script looks
up its item by id in the run's data files (paths as logged: run it from the repository root),
judges the response again under the run's --reward with the MiniLM verifier and counts (logged
label -> label now) per setting; a span that the judgement now does not have (the claims are cut
otherwise) counts as "gone". What moves is the verdict's and the verifier's change together.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402
from steps import read_log  # noqa: E402


def main(run_dirs: list[str], verifier=None) -> Counter:
    verifier = verifier or balto.make_verifier("minilm", balto.pick_device("cpu"))
    moves: Counter = Counter()  # (setting, logged label, label now or "gone") -> claims
    for run_dir in run_dirs:
        rows = read_log(run_dir)
        items, settings = {}, {}
        for path in rows[0]["data"]:
            for _, item in balto.read_jsonl(path, "data file"):
                items[item["id"]] = item
                settings[item["id"]] = Path(path).stem
        for row in rows:
            if row["event"] != "step":
                continue
            example = row["example"]
            item = items[example["id"]]
            now = balto.judge_responses(verifier, [item], [example["text"]], [[]],
                                        rows[0]["support_threshold"], rows[0]["reward"])
            labels_now = {(start, end): f"{label:+d}" for (start, end), label
                          in zip(now.spans[0], now.verdicts[0])}
            for start, end, logged in example["spans"]:
                label = labels_now.get((start, end), "gone")
                moves[settings[item["id"]], f"{logged:+d}", label] += 1
    for setting in sorted({key[0] for key in moves}):
        print(f"{setting}: logged label -> label now, claims")
        for (name, logged, label), count in sorted(moves.items()):
            if name == setting:
                print(f"  {logged} -> {label}: {count}")
    return moves


if __name__ == "__main__":
    if not sys.argv[1:] or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if sys.argv[1:] else 2)
    main(sys.argv[1:])
