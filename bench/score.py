"""Score saved policies on a prompt file they never trained on, with balto's own evaluate().

    python bench/score.py bench/dev.jsonl runs/dev base=smollm2 beta0.02-s0=runs/compare/balanced-s0 ...

Each NAME=POLICY (a saved run directory, or smollm2 for the untrained model) is evaluated on every item
of the file at the default sampling settings and written to OUT/NAME/metrics.json, in the layout that
`bench/compare.py OUT` tabulates with paired bootstrap intervals.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def main(data: str, out: str, runs: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = balto.Config()
    items, device = balto.load_items(data), balto.pick_device(cfg.device)
    verifier = balto.make_verifier(cfg.verifier, device)
    for run in runs:
        name, path = run.split("=", 1)
        policy, tokenizer = balto.load_policy(path)
        metrics = balto.evaluate(policy.to(device).eval(), tokenizer, verifier, items, cfg, device)
        Path(out, name).mkdir(parents=True, exist_ok=True)
        Path(out, name, "metrics.json").write_text(json.dumps({"after": metrics, "policy": path, "data": data}))
        print(f"{name}: Q {metrics['q_score']:.3f}, hallucination {metrics['hallucination_rate']:.3f}, "
              f"F1 {metrics['informativeness']:.3f}, {metrics['response_len']:.1f} tokens", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
