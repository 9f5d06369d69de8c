"""The verifier's accuracy on labelled (context, claim) pairs, per category, beside the trivial verifiers.

    python bench/check_verifier.py bench/verifier_pairs.jsonl            # balto's MiniLM verifier
    python bench/check_verifier.py bench/verifier_pairs.jsonl rules      # the rules alone, no weights

The file is JSONL, one {context, claim, supported, category?, question?} object per line; with a
question, a bare answer ("1974.") is checked as the answer to it. A claim counts as supported
when balto's verifier gives p(supported) >= balto.py's --support-threshold default, as in training.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def load_verifier_pairs(path: str) -> list[dict]:
    pairs = []
    for line_no, pair in balto.read_jsonl(path, "verifier pairs file"):
        for key in ("context", "claim", "supported"):
            if key not in pair:
                raise balto.BaltoError(f"{path}:{line_no}: field {key!r} is missing")
        pair.setdefault("category", "all")
        pairs.append(pair)
    return pairs


def check_verifier(verifier, pairs: list[dict], path: str,
                   threshold: float = balto.Config.support_threshold) -> dict[str, float]:
    """Accuracy per category and overall, next to the two trivial verifiers."""
    scores = verifier.score([(p["context"], p.get("question", ""), p["claim"]) for p in pairs])
    correct: dict[str, list[int]] = {}
    for pair, score in zip(pairs, scores):
        hit = int((score >= threshold) == bool(pair["supported"]))
        correct.setdefault(pair["category"], []).append(hit)
        correct.setdefault("overall", []).append(hit)
    positives = sum(bool(p["supported"]) for p in pairs) / len(pairs)
    print(f"verifier {verifier.name} on {path} ({len(pairs)} pairs, threshold {threshold})")
    width = max(len(category) for category in correct) + 2
    print(f"{'category':<{width}}{'n':>4}{'accuracy':>10}")
    for category, hits in sorted(correct.items(), key=lambda kv: kv[0] == "overall"):
        print(f"{category:<{width}}{len(hits):>4}{sum(hits) / len(hits):>10.3f}")
    print(f"trivial: always supported {positives:.3f}, always unsupported {1 - positives:.3f}")
    return {category: sum(hits) / len(hits) for category, hits in correct.items()}


def main(argv: list[str]) -> dict[str, float]:
    if len(argv) not in (1, 2) or (argv[1:] and argv[1] not in ("minilm", "rules")):
        print("usage: python bench/check_verifier.py PAIRS.jsonl [minilm | rules]", file=sys.stderr)
        raise SystemExit(2)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        pairs = load_verifier_pairs(argv[0])  # bad input fails before any weights load
        verifier = balto.make_verifier(argv[1] if argv[1:] else "minilm", balto.pick_device("auto"))
        return check_verifier(verifier, pairs, argv[0])
    except balto.BaltoError as err:
        print(f"check_verifier: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
