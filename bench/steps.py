"""The step times of a run, from its log: the median step and its parts, decode time per token,
response tokens per second.

    python bench/steps.py runs/balto
    python bench/steps.py bench/results/v4/balanced-s0   # a committed run: log.jsonl.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path


def read_log(run_dir: str) -> list[dict]:
    """The rows of a run's log.jsonl, or of the log.jsonl.gz that bench/results keeps instead."""
    path = Path(run_dir) / "log.jsonl"
    packed = Path(run_dir) / "log.jsonl.gz"
    if path.exists():
        text = path.read_text(encoding="utf-8")
    elif packed.exists():
        text = gzip.decompress(packed.read_bytes()).decode("utf-8")
    else:
        print(f"{run_dir}: no log.jsonl or log.jsonl.gz here (a run's --output-dir, or "
              f"bench/results/vN/RUN)", file=sys.stderr)
        raise SystemExit(2)
    return [json.loads(line) for line in text.splitlines()]


def run_dir_argument(doc: str) -> str:
    """The one argument of this script and of rollouts.py: a run's folder (--help prints doc)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's --output-dir, or bench/results/vN/RUN")
    return parser.parse_args().run_dir


def main(run_dir: str) -> dict:
    rows = read_log(run_dir)
    config = rows[0]
    steps = [row for row in rows if row["event"] == "step"]
    responses = config["prompts_per_step"] * config["group_size"]
    summary = {key: statistics.median(step[key] for step in steps)
               for key in ("step_s", "generate_s", "verify_s", "update_s")}
    # the sampler draws one token for every row per decode step, until every row has ended
    per_token = [step["generate_s"] / step["decode_steps"] for step in steps if step.get("decode_steps")]
    summary["decode_ms_per_token"] = 1000 * statistics.median(per_token) if per_token else float("nan")
    tokens = [responses * step["response_len"] / step["step_s"] for step in steps]
    summary["response_tokens_per_s"] = statistics.median(tokens)
    print(f"{run_dir}: {len(steps)} steps of {responses} responses; median step {summary['step_s']:.2f} s "
          f"(generate {summary['generate_s']:.2f}, verify {summary['verify_s']:.2f}, update "
          f"{summary['update_s']:.2f}); decoding {summary['decode_ms_per_token']:.1f} ms a token for "
          f"{responses} rows; {summary['response_tokens_per_s']:.1f} response tokens a second")
    return summary


if __name__ == "__main__":
    main(run_dir_argument(__doc__))
