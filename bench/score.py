"""Score saved policies on prompt files they never trained on, with balto's own evaluate().

    python bench/score.py bench/dev.jsonl runs/dev base=smollm2 beta0.02-s0=runs/compare/balanced-s0 ...
    python bench/score.py bench/dev.jsonl,data/squad.jsonl runs/dev base=smollm2 ...

Each NAME=POLICY (a saved run directory, or smollm2 for the untrained model) is evaluated on every item
of each file (a setting, named by the file's stem, as balto.py's --data; of a file whose lines carry a
split, the held-out prompts balto.py scores) at the default sampling settings and reward, and written
to OUT/NAME/metrics.json as balto.py writes it ({"after": {setting: metrics}}), in the layout that
`bench/compare.py OUT` tabulates with paired bootstrap intervals.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def main(data: str, out: str, runs: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    paths = data.split(",")
    cfg = balto.Config(data=tuple(paths))
    settings = {}
    for path in paths:
        if Path(path).stem in settings:
            raise SystemExit(f"score: error: two files named {Path(path).stem!r}: a setting is a file name")
        items = balto.load_items(path)
        if items and "split" in items[0]:  # a public set (tools/public_data.py): its held-out lines, as balto.py
            items = balto.split_items(items, cfg.eval_size, path)[1]
        settings[Path(path).stem] = items  # otherwise every item: a file no run trained on
    device = balto.pick_device(cfg.device)
    verifier = balto.make_verifier(cfg.verifier, device)
    for run in runs:
        name, path = run.split("=", 1)
        policy, tokenizer = balto.load_policy(path)
        policy = policy.to(device).eval()
        after = {}
        for setting, items in settings.items():
            after[setting] = balto.evaluate(policy, tokenizer, verifier, items, cfg, device)
            metrics = after[setting]
            print(f"{name} on {setting}: Q {metrics['q_score']:.3f}, hallucination "
                  f"{metrics['hallucination_rate']:.3f}, F1 {metrics['informativeness']:.3f}, answer recall "
                  f"{metrics['answer_recall']:.3f}, {metrics['response_len']:.1f} tokens", flush=True)
        Path(out, name).mkdir(parents=True, exist_ok=True)
        record = {"before": None, "after": after, "config": dataclasses.asdict(cfg),
                  "provenance": balto.provenance(device, "float32"), "policy": path, "data": paths}
        Path(out, name, "metrics.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
