"""Checks of tools/public_data.py on tiny fake SQuAD and TAT-QA data built here (no network, no
real files): the filters and caps, the table rendering, the split by document, the checksum
error.

    python -m pytest -q tools/test_public_data.py
"""
import importlib.util
from collections import Counter
from pathlib import Path

spec = importlib.util.spec_from_file_location("public_data",
                                              Path(__file__).with_name("public_data.py"))
public_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(public_data)


def squad_qa(qid, question, answer):
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": 0}]}


def fake_squad():
    short = "Ada Lovelace wrote the first program in 1843 for the Analytical Engine."
    return {"version": "1.1", "data": [
        {"title": "Ada", "paragraphs": [
            {"context": short, "qas": [
                squad_qa("q1", "Who wrote the first program?", "Ada Lovelace"),
                squad_qa("q2", "What did she write?", "the first program in 1843 for the Engine"),
                squad_qa("q3", "When?", "1843"),
                squad_qa("q4", "For what?", "the Analytical Engine"),
                squad_qa("q5", "Where?", "in London"),  # not in the context
            ]},
            {"context": "word " * 171, "qas": [squad_qa("q6", "Long?", "word")]},
        ]},
        {"title": "Babbage", "paragraphs": [
            {"context": "Charles Babbage designed the Analytical Engine.", "qas": [
                squad_qa("q7", "Who designed it?", "Charles Babbage")]},
        ]},
    ]}


def tatqa_question(uid, answer, answer_type="span", scale="", rel=("1",)):
    return {"uid": uid, "order": 1, "question": f"Question {uid}?", "answer": answer,
            "answer_type": answer_type, "answer_from": "table-text", "scale": scale,
            "rel_paragraphs": list(rel)}


def tatqa_entry(uid, questions, paragraphs=None):
    table = {"uid": uid, "table": [["", "2019", "2018"], ["", "", ""],
                                   [" Revenue ", "1,200", "1,100"], ["Cost", "", "900"]]}
    paragraphs = paragraphs or [{"uid": "p2", "order": 2, "text": "Revenue grew by 9%."},
                                {"uid": "p1", "order": 1, "text": "Figures in millions."}]
    return {"table": table, "paragraphs": paragraphs, "questions": questions}


def test_table_rendering_skips_empty_rows_and_orders_paragraphs():
    entry = tatqa_entry("t1", [])
    assert public_data.render_table(entry["table"]["table"]) == (
        "| 2019 | 2018\nRevenue | 1,200 | 1,100\nCost |  | 900")
    assert public_data.render_tatqa(entry["table"], entry["paragraphs"]) == (
        "| 2019 | 2018\nRevenue | 1,200 | 1,100\nCost |  | 900\n"
        "Figures in millions.\nRevenue grew by 9%.")
    assert public_data.render_tatqa(entry["table"], entry["paragraphs"], {"2"}).endswith(
        "900\nRevenue grew by 9%.")


def test_squad_filters():
    stats = Counter()
    items = public_data.convert_squad(fake_squad(), stats)
    # q2: answer over 6 words; q3, q4: a second and third question for the paragraph;
    # q5: not in the context; q6: context over 170 words
    assert [i["id"] for i in items] == ["squad-q1", "squad-q7"]
    assert items[0]["doc"] == "Ada" and items[0]["answer"] == "Ada Lovelace"
    assert stats["dropped: answer too long"] == 1
    assert stats["dropped: answer not in context"] == 1
    assert stats["dropped: over 1 per paragraph"] == 2
    assert stats["dropped: over 10 per article"] == 0
    assert stats["dropped: context too long"] == 1


def test_squad_at_most_10_per_article():
    def paragraph(n):
        context = f"Item {n} is red. Item {n} is blue."
        return {"context": context, "qas": [
            squad_qa(f"p{n}-x", "Green?", "green"),  # not in the context: uses no slot
            squad_qa(f"p{n}-a", f"Colour of item {n}?", "red"),
            squad_qa(f"p{n}-b", f"Other colour of item {n}?", "blue"),  # over 1 per paragraph
        ]}
    raw = {"data": [{"title": "Many", "paragraphs": [paragraph(n) for n in range(12)]},
                    {"title": "Next", "paragraphs": [paragraph(n) for n in range(12, 14)]}]}
    stats = Counter()
    items = public_data.convert_squad(raw, stats)
    many = [i["id"] for i in items if i["doc"] == "Many"]
    assert many == [f"squad-p{n}-a" for n in range(10)]  # the first 10 in file order
    assert [i["id"] for i in items if i["doc"] == "Next"] == ["squad-p12-a", "squad-p13-a"]
    # in paragraphs 10 and 11 nothing was kept, so both a and b meet the article cap there
    assert stats["dropped: over 10 per article"] == 4
    assert stats["dropped: over 1 per paragraph"] == 12
    assert stats["dropped: answer not in context"] == 14


def test_tatqa_filters():
    long_text = "padding " * 230
    raw = [
        tatqa_entry("t1", [
            tatqa_question("a", ["1,200"]),
            tatqa_question("b", ["1,200", "1,100"], answer_type="multi-span"),
            tatqa_question("c", ["Costs fell"]),  # not in the context
            tatqa_question("d", ["9%"]),  # a second question of this entry
        ]),
        tatqa_entry("t2", [tatqa_question("f", ["Revenue grew"], rel=["1"])],
                    paragraphs=[{"uid": "p1", "order": 1, "text": "Revenue grew."},
                                {"uid": "p2", "order": 2, "text": long_text}]),
        tatqa_entry("t3", [tatqa_question("g", ["padding"])],
                    paragraphs=[{"uid": "p1", "order": 1, "text": long_text}]),
        tatqa_entry("t4", [tatqa_question("h", " 1,100 ", scale="million")]),
    ]
    stats = Counter()
    items = public_data.convert_tatqa(raw, stats)
    assert [i["id"] for i in items] == ["tatqa-a", "tatqa-f", "tatqa-h"]
    assert items[0]["answer"] == "1,200" and items[0]["doc"] == "t1"
    assert "padding" not in items[1]["context"]  # only the rel_paragraphs were kept
    assert items[1]["context"].endswith("900\nRevenue grew.")
    assert items[2]["answer"] == "1,100"  # the span as given: no scale word
    assert stats["dropped: not a single span"] == 1
    assert stats["dropped: answer not in context"] == 1
    assert stats["dropped: over 1 per entry"] == 1
    assert stats["dropped: context too long"] == 1
    assert stats["dropped: answer too long"] == 0
    assert stats["kept: table + rel_paragraphs only"] == 1


def test_tatqa_answer_at_most_8_words():
    text = "one two three four five six seven eight nine ten"
    raw = [
        tatqa_entry("t1", [
            tatqa_question("a", [text[:text.index(" ten")]]),  # 9 words: dropped, uses no slot
            tatqa_question("b", [text[:text.index(" nine")]]),  # 8 words: kept
        ], paragraphs=[{"uid": "p1", "order": 1, "text": text}]),
    ]
    stats = Counter()
    items = public_data.convert_tatqa(raw, stats)
    assert [i["id"] for i in items] == ["tatqa-b"]
    assert len(items[0]["answer"].split()) == 8
    assert stats["dropped: answer too long"] == 1
    assert stats["dropped: over 1 per entry"] == 0


def test_split_by_document_keeps_documents_whole():
    items = [public_data.make_item(f"x-{doc}-{n}", f"doc{doc}", "c", "q", "a")
             for doc in range(20) for n in range(doc % 3 + 1)]
    out = public_data.split_by_document(items, heldout_min=5, train_min=8)
    heldout = [i for i in out if i["split"] == "heldout"]
    train = [i for i in out if i["split"] == "train"]
    assert len(heldout) >= 5 and len(train) >= 8 and len(out) < len(items)
    assert not {i["doc"] for i in heldout} & {i["doc"] for i in train}
    for doc in {i["doc"] for i in out}:  # a document is taken whole or not at all
        assert sum(i["doc"] == doc for i in out) == sum(i["doc"] == doc for i in items)
    assert out == train + heldout and list(out[0]) == list(public_data.KEYS)
    assert out == public_data.split_by_document(items, heldout_min=5, train_min=8)


def test_bad_checksum_is_one_line_and_exit_2(tmp_path, capsys):
    squad = tmp_path / "dev-v1.1.json"
    squad.write_text("{}")
    tatqa = tmp_path / "tatqa.json"
    tatqa.write_text("[]")
    assert public_data.main([str(squad), str(tatqa), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(squad) in err and "SHA-256" in err
    assert not (tmp_path / "out").exists()
