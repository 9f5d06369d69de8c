"""Can the words tell whether the context holds an answer, and where? (docs/method.md, step 4)

    python bench/answerable.py data_sample.jsonl bench/dev.jsonl
    python bench/answerable.py --where data_sample.jsonl data/squad.jsonl data/tatqa.jsonl

For each item of the files' training parts (data_sample.jsonl's held-out items are left out), the
share of the question's content words found in the clause the question asks about
(RuleVerifier.question_clause), for the items whose reference answer abstains and for the others.
If the two ranges overlap, no threshold on it separates them, and the reward judges an abstention
by the reference answer instead.

With --where: on each file's training items whose reference answers, how often the clause the
question asks about (balto.answer_source: a table row with its header where the question asks for
a heading) holds every key term of the reference: how often the answering verdict looks in the
right place (the rules' choice, without the encoder's tie-break).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def question_share(item: dict) -> float:
    clauses = balto.context_clauses(item["context"])
    asked = balto.RuleVerifier().question_clause(item["context"], item["question"])
    wanted = {balto.stem(w) for w in balto.content_words(item["question"])}
    found = {balto.stem(w) for w in balto.words(clauses[asked])}
    return len(wanted & found) / max(1, len(wanted))


def main(paths: list[str]) -> None:
    shares = {"no answer (reference abstains)": [], "answer in the context": []}
    for path in paths:
        items = balto.load_items(path)
        if path.endswith("dev.jsonl"):  # development prompts: none held out
            train = items
        else:
            train, _ = balto.split_items(items, balto.Config.eval_size, path)
        for item in train:
            unanswerable = balto.is_abstention(item.get("answer", ""))
            key = "no answer (reference abstains)" if unanswerable else "answer in the context"
            shares[key].append(question_share(item))
    for name, values in shares.items():
        print(f"{name}: {len(values)} items, share of the question's words in its clause "
              f"min {min(values):.2f}, median {statistics.median(values):.2f}, "
              f"max {max(values):.2f}")


def where(paths: list[str]) -> None:
    for path in paths:
        train, _ = balto.split_items(balto.load_items(path), balto.Config.eval_size, path)
        held = total = 0
        for item in train:
            if balto.is_abstention(item.get("answer", "")):
                continue
            asked = balto.RuleVerifier().question_clause(item["context"], item["question"])
            grounds = balto.answer_source(balto.context_clauses(item["context"]), asked, item["question"])
            found = {balto.stem(balto.normalise_number(w)) for w in balto.words(grounds)}
            total += 1
            held += balto.key_terms(item["answer"], item["question"]) <= found
        print(f"{path}: the question's clause holds the reference answer for {held} of {total} "
              f"training items ({held / total:.2f})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--where"]:
        where(sys.argv[2:])
    else:
        main(sys.argv[1:] or ["data_sample.jsonl", "bench/dev.jsonl"])
