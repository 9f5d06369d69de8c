"""The answering verdict's accuracy on labelled responses, per category.

    python bench/check_answers.py bench/answer_cases.jsonl            # balto's MiniLM verifier
    python bench/check_answers.py bench/answer_cases.jsonl rules      # the rules alone, no weights

The file is JSONL, one {context, question, answer?, response, expected, category} object a line:
expected lists the labels balto.judge_responses should give the response's claims, then its
abstentions, then its talk in place of an answer, under --reward answering (+1 answers, 0 supported
beside the question or said before, -1 unsupported, a wrong abstention or talk in place of an
answer). A case counts as right when every label matches.

The verdict reads a case's reference answer where it has one (balto.reference_clause); most RAG
data has none, so each run also checks the verdict with the references taken away, on the
categories whose right label is the same without one (an abstention's is not: without a
reference the reward cannot tell a right abstention from a wrong one, and leaves it neutral).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def load_cases(path: str) -> list[dict]:
    cases = []
    for line_no, case in balto.read_jsonl(path, "answer cases file"):
        for key in ("context", "question", "response", "expected", "category"):
            if key not in case:
                raise balto.BaltoError(f"{path}:{line_no}: field {key!r} is missing")
        cases.append(case)
    return cases


REFERENCE_FREE = ("answers", "beside", "repeated", "pasted", "unsupported", "talk")


def without_references(cases: list[dict]) -> list[dict]:
    """The cases whose labels hold without a reference answer, with their references removed."""
    return [{key: value for key, value in case.items() if key != "answer"}
            for case in cases if case["category"] in REFERENCE_FREE]


def check_answers(verifier, cases: list[dict], path: str) -> dict[str, float]:
    """Accuracy per category and overall; prints each miss with the labels it got."""
    verdict = balto.judge_responses(verifier, cases, [c["response"] for c in cases],
                                    [[] for _ in cases], balto.Config.support_threshold,
                                    "answering")
    correct: dict[str, list[int]] = {}
    print(f"answering verdict, verifier {verifier.name}, on {path} ({len(cases)} responses)"
          f"{'' if any('answer' in case for case in cases) else ', no reference answers'}")
    for case, got in zip(cases, verdict.verdicts):
        hit = int(got == case["expected"])
        correct.setdefault(case["category"], []).append(hit)
        correct.setdefault("overall", []).append(hit)
        if not hit:
            print(f"  miss: {case['response'][:70]!r} got {got}, expected {case['expected']}")
    accuracy = {name: sum(hits) / len(hits) for name, hits in correct.items()}
    width = max(len(name) for name in accuracy)
    for name, value in accuracy.items():
        print(f"{name:<{width}} {len(correct[name]):>4} {value:>8.3f}")
    return accuracy


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "bench/answer_cases.jsonl"
    name = argv[1] if len(argv) > 1 else "minilm"
    try:
        verifier = balto.make_verifier(name, balto.pick_device("cpu"))
        cases = load_cases(path)
        accuracy = check_answers(verifier, cases, path)
        print()
        check_answers(verifier, without_references(cases), path)
        return accuracy
    except balto.BaltoError as err:
        print(f"check_answers: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
