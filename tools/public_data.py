"""Turn two public grounded-QA files into small JSONL sets for training and held-out evaluation.

    python tools/public_data.py SQUAD_DEV_JSON TATQA_TEST_GOLD_JSON --out data

writes data/squad.jsonl and data/tatqa.jsonl and prints, for each, its items and documents per
split and its SHA-256. Each raw file's SHA-256 is checked first: on a mismatch (or a missing file)
the script prints one line naming the file and exits with status 2. The output depends on nothing
but the two raw files: the same files give the same bytes.

Sources (get them at these commits):

    git clone https://github.com/bloomsburyai/question-generation
    git -C question-generation checkout 88cc78cb56123efdf20abb0f4640a0405f1291e3
    git clone https://github.com/NExTplusplus/TAT-QA
    git -C TAT-QA checkout 870accc41953dcde885aabeb963d94aabdc0fbc3
    python tools/public_data.py question-generation/data/dev-v1.1.json \\
        TAT-QA/dataset_raw/tatqa_dataset_test_gold.json --out data

1. data/dev-v1.1.json of bloomsburyai/question-generation @ 88cc78cb: half of the SQuAD v1.1
   dev set, CC BY-SA 4.0 (Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine
   Comprehension of Text"). data/squad.jsonl stays under CC BY-SA 4.0. The other half,
   data/test-v1.1.json of that repository, is kept apart as a check set: this script never
   reads it.
2. dataset_raw/tatqa_dataset_test_gold.json of NExTplusplus/TAT-QA @ 870accc4: CC BY 4.0 (Zhu
   et al. 2021, "TAT-QA: A Question Answering Benchmark on a Hybrid of Tabular and Textual
   Content in Finance"). TAT-QA's dev and train files are never read.

What an item is. One JSON object a line, keys in this order: id ("squad-<question id>",
"tatqa-<question uid>"), doc (the SQuAD article title; the TAT-QA table uid), split ("train" or
"heldout"), context, question, answer. Each file holds its train items first, then its held-out
items, each part sorted by id.

- SQuAD: the context is the paragraph as is; the answer is the question's first given answer.
- TAT-QA: only questions with answer_type "span" (one span). The context is the table, one row
  a line with its cells (stripped) joined by " | " and the line stripped at both ends (empty
  cells stay; rows whose cells are all empty are skipped), then the entry's paragraphs in their
  `order`, one a line. If that is over the word limit, the context is the table plus only the
  question's rel_paragraphs, rendered the same way; if that is still over, the question is
  skipped. The answer is the span exactly as given (stripped); no scale word is added.

Filters, in this order: context at most 170 words (SQuAD) or 220 words (TAT-QA), words counted by
whitespace split (a table's "|" counts as a word); answers at most 6 words (SQuAD) or 8 words
(TAT-QA), counted the same way; the answer must occur in the context (case-insensitive); then the
caps, each keeping the first questions in file order that pass everything before it:
- SQuAD: at most 1 question per paragraph, then at most 10 questions per article (title).
- TAT-QA: at most 1 question per entry (a table with its paragraphs).

Split by document: the distinct documents, sorted, are shuffled with random.Random(1234) and
walked in that order; whole documents go to "heldout" until it holds at least 64 items, then
whole documents go to "train" until it holds at least 160 items, and the rest are left out. No
document is on both sides.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

SQUAD_SHA256 = "bf8ebb60a161d0594f455be869ff3a476d2fe07da92ab1ecb0dea41f50ea64f3"
TATQA_SHA256 = "c4d08418359c1d76468dec420ee748a37f48c06b63cb8ec2766f19d5d314b597"

SQUAD_MAX_CONTEXT_WORDS = 170
SQUAD_MAX_ANSWER_WORDS = 6
TATQA_MAX_CONTEXT_WORDS = 220
SQUAD_PER_PARAGRAPH = 1
SQUAD_PER_ARTICLE = 10
TATQA_MAX_ANSWER_WORDS = 8
TATQA_PER_ENTRY = 1
SEED = 1234
HELDOUT_MIN = 64
TRAIN_MIN = 160

KEYS = ("id", "doc", "split", "context", "question", "answer")


class ChecksumError(Exception):
    """A raw file is missing or is not the expected one."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ChecksumError(f"{path}: no such file")
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(f"{path}: SHA-256 is {actual}, expected {expected} "
                            "(wrong file or wrong commit)")


def word_count(text: str) -> int:
    return len(text.split())


def answer_in_context(answer: str, context: str) -> bool:
    return answer.lower() in context.lower()


def make_item(item_id: str, doc: str, context: str, question: str, answer: str) -> dict:
    return {"id": item_id, "doc": doc, "split": None, "context": context,
            "question": question.strip(), "answer": answer}


# SQuAD


def convert_squad(raw: dict, stats: Counter) -> list[dict]:
    """Items from SQuAD v1.1 data, in file order, filtered (see the module docstring)."""
    items = []
    for key in ("context too long", "answer too long", "answer not in context",
                f"over {SQUAD_PER_PARAGRAPH} per paragraph",
                f"over {SQUAD_PER_ARTICLE} per article"):
        stats[f"dropped: {key}"] += 0  # listed even when nothing was dropped
    for article in raw["data"]:
        in_article = 0
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            in_paragraph = 0
            for qa in paragraph["qas"]:
                stats["questions"] += 1
                answer = qa["answers"][0]["text"].strip()
                if word_count(context) > SQUAD_MAX_CONTEXT_WORDS:
                    stats["dropped: context too long"] += 1
                elif word_count(answer) > SQUAD_MAX_ANSWER_WORDS:
                    stats["dropped: answer too long"] += 1
                elif not answer_in_context(answer, context):
                    stats["dropped: answer not in context"] += 1
                elif in_paragraph >= SQUAD_PER_PARAGRAPH:
                    stats[f"dropped: over {SQUAD_PER_PARAGRAPH} per paragraph"] += 1
                elif in_article >= SQUAD_PER_ARTICLE:
                    stats[f"dropped: over {SQUAD_PER_ARTICLE} per article"] += 1
                else:
                    in_paragraph += 1
                    in_article += 1
                    items.append(make_item(f"squad-{qa['id']}", article["title"], context,
                                           qa["question"], answer))
    return items


# TAT-QA


def render_table(rows: list[list[str]]) -> str:
    """One row a line, cells stripped and joined by " | "; rows of empty cells are skipped.

    Empty cells are kept, so columns line up; each line is stripped at both ends.
    """
    lines = []
    for row in rows:
        cells = [str(cell).strip() for cell in row]
        if any(cells):
            lines.append(" | ".join(cells).strip())
    return "\n".join(lines)


def render_tatqa(table: dict, paragraphs: list[dict], keep: set[str] | None = None) -> str:
    """The table, then the paragraphs in `order` (only those whose order is in `keep`, if given)."""
    ordered = sorted(paragraphs, key=lambda p: int(p["order"]))
    texts = [p["text"].strip() for p in ordered if keep is None or str(p["order"]) in keep]
    return "\n".join(part for part in [render_table(table["table"])] + texts if part)


def tatqa_span(question: dict) -> str | None:
    """The span of a single-span question; None for any other question."""
    if question.get("answer_type") != "span":
        return None
    answer = question["answer"]
    if isinstance(answer, list):
        if len(answer) != 1:
            return None
        answer = answer[0]
    return str(answer).strip() or None


def tatqa_context(entry: dict, question: dict) -> str | None:
    """The full rendering if short enough, else the table with the rel_paragraphs, else None."""
    full = render_tatqa(entry["table"], entry["paragraphs"])
    if word_count(full) <= TATQA_MAX_CONTEXT_WORDS:
        return full
    keep = {str(order) for order in question.get("rel_paragraphs") or []}
    short = render_tatqa(entry["table"], entry["paragraphs"], keep)
    if word_count(short) <= TATQA_MAX_CONTEXT_WORDS:
        return short
    return None


def convert_tatqa(raw: list[dict], stats: Counter) -> list[dict]:
    """Items from TAT-QA entries, in file order, filtered (see the module docstring)."""
    items = []
    for key in ("not a single span", "context too long", "answer too long",
                "answer not in context", f"over {TATQA_PER_ENTRY} per entry"):
        stats[f"dropped: {key}"] += 0  # listed even when nothing was dropped
    for entry in raw:
        kept = 0
        for question in entry["questions"]:
            stats["questions"] += 1
            span = tatqa_span(question)
            if span is None:
                stats["dropped: not a single span"] += 1
                continue
            context = tatqa_context(entry, question)
            if context is None:
                stats["dropped: context too long"] += 1
            elif word_count(span) > TATQA_MAX_ANSWER_WORDS:
                stats["dropped: answer too long"] += 1
            elif not answer_in_context(span, context):
                stats["dropped: answer not in context"] += 1
            elif kept >= TATQA_PER_ENTRY:
                stats[f"dropped: over {TATQA_PER_ENTRY} per entry"] += 1
            else:
                kept += 1
                if context != render_tatqa(entry["table"], entry["paragraphs"]):
                    stats["kept: table + rel_paragraphs only"] += 1
                items.append(make_item(f"tatqa-{question['uid']}", entry["table"]["uid"],
                                       context, question["question"], span))
    return items


# The split


def split_by_document(items: list[dict], heldout_min: int = HELDOUT_MIN,
                      train_min: int = TRAIN_MIN, seed: int = SEED) -> list[dict]:
    """Train items then held-out items, each sorted by id, with "split" set (module docstring)."""
    by_doc: dict[str, list[dict]] = {}
    for item in items:
        by_doc.setdefault(item["doc"], []).append(item)
    docs = sorted(by_doc)
    random.Random(seed).shuffle(docs)
    heldout, train = [], []
    for doc in docs:
        if len(heldout) < heldout_min:
            heldout.extend(by_doc[doc])
        elif len(train) < train_min:
            train.extend(by_doc[doc])
        else:
            break
    if len(heldout) < heldout_min or len(train) < train_min:
        raise ValueError(f"too few items: {len(heldout)} held-out (want {heldout_min}), "
                         f"{len(train)} train (want {train_min})")
    assert not {i["doc"] for i in heldout} & {i["doc"] for i in train}, "a document on both sides"
    out = []
    for split, part in (("train", train), ("heldout", heldout)):
        for item in sorted(part, key=lambda i: i["id"]):
            out.append({key: (split if key == "split" else item[key]) for key in KEYS})
    return out


# Output


def write_jsonl(path: Path, items: list[dict]) -> None:
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    path.write_bytes(text.encode("utf-8"))


def summary(path: Path, items: list[dict], stats: Counter) -> str:
    """Counts per split, the SHA-256, then what the filters did over the whole raw file."""
    lines = [f"{path}: sha256 {sha256_of(path)}"]
    for split in ("train", "heldout"):
        part = [i for i in items if i["split"] == split]
        lines.append(f"  {split}: {len(part)} items, {len({i['doc'] for i in part})} documents")
    lines.append("  filters, over all questions of the raw file (before the split):")
    lines += [f"    {key}: {value}" for key, value in sorted(stats.items())]
    return "\n".join(lines)


def load_json(path: Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("squad_dev", type=Path, help="question-generation's data/dev-v1.1.json")
    parser.add_argument("tatqa_test_gold", type=Path,
                        help="TAT-QA's dataset_raw/tatqa_dataset_test_gold.json")
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder")
    args = parser.parse_args(argv)
    try:
        check_sha256(args.squad_dev, SQUAD_SHA256)
        check_sha256(args.tatqa_test_gold, TATQA_SHA256)
    except ChecksumError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = (("squad.jsonl", args.squad_dev, convert_squad),
            ("tatqa.jsonl", args.tatqa_test_gold, convert_tatqa))
    for name, source, convert in jobs:
        stats: Counter = Counter()
        items = split_by_document(convert(load_json(source), stats))
        path = args.out / name
        write_jsonl(path, items)
        print(summary(path, items, stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
