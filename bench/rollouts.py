"""The logged rollouts of a run's last 20 steps, each response with its labelled spans: the reading
that rule 5 asks for beside the numbers (pasting, terseness, questions, hedging).

    python bench/rollouts.py bench/results/v4/response-s2

Each step logs one response of its batch (balto.py section 10). A span is marked [+ +] answering
(or supported, under --reward supported), [- -] unsupported, [0 0] neutral; text outside the marks
is not a claim. "mean reward" is the step's mean over its responses; "credit" is the credit on the
response's first token (a whole-response mode gives every token the same). The last line counts the
responses that answer nothing (no +1 span, no abstention, however worded) and, of those, the ones
that talk in place of an answer (rule 11): a question or the question restated (balto.is_talk),
read the same way in any run's log (which does not hold the reference: talk where it abstains counts).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402
from steps import read_log, run_dir_argument  # noqa: E402

LAST = 20  # steps 41-60 of a 60-step run
MARKS = {1: "+", -1: "-", 0: "0"}


def marked(text: str, spans: list) -> str:
    """The text with each labelled span (start, end, label) wrapped in its mark, on one line.

    >>> marked("It is 8. Or 9.", [[0, 8, 1], [9, 14, -1]])
    '[+ It is 8. +] [- Or 9. -]'
    """
    out, at = [], 0
    for start, end, label in sorted(spans):  # claims first, then abstentions and talk: in text order
        mark = MARKS[label]
        out.append(text[at:start])
        out.append(f"[{mark} {text[start:end]} {mark}]")
        at = end
    out.append(text[at:])
    return "".join(out).replace("\n", " / ")


def answers_nothing(text: str, spans: list) -> bool:
    """The response has no +1 span and no abstention.

    >>> answers_nothing("Thanks! I will look.", [])
    True
    >>> answers_nothing("The context does not say.", [[0, 25, -1]])
    False
    """
    clauses = [text[start:end] for start, end in balto.segment(text)]
    return not any(label == 1 for _, _, label in spans) and not any(map(balto.is_abstention, clauses))


def talks_instead(text: str, spans: list) -> bool:
    """The response talks in place of an answer: it answers nothing and has a talk clause.

    >>> talks_instead("The question is asking who founded it.", [])
    True
    >>> talks_instead("The question is asking who founded it. Ana did.", [[39, 48, 1]])
    False
    """
    clauses = [text[start:end] for start, end in balto.segment(text)]
    return answers_nothing(text, spans) and any(map(balto.is_talk, clauses))


def main(run_dir: str) -> list[str]:
    steps = [row for row in read_log(run_dir) if row["event"] == "step"]
    lines = []
    for row in steps[-LAST:]:
        example = row["example"]
        credit = example["credit"][0] if example["credit"] else 0.0
        lines.append(f"step {row['step']} (mean reward {row['reward']:.2f}, credit {credit:+.2f}): "
                     f"{example['question']}")
        lines.append("    " + marked(example["text"], example["spans"]))
    examples = [row["example"] for row in steps[-LAST:]]
    nothing = sum(answers_nothing(example["text"], example["spans"]) for example in examples)
    talking = sum(talks_instead(example["text"], example["spans"]) for example in examples)
    lines.append(f"answering nothing: {nothing} of {len(examples)}, talk in place of an answer: {talking}")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main(run_dir_argument(__doc__))
