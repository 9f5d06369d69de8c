"""Checks of tools/report.py: the credit it shows is balto.assign_credit's, every token is on the page
with colours that follow its credit, spans are outlined by their label, mixed responses are preferred,
each setting has its own held-out table, and real logs of a finished and an interrupted run both give
a page. Run with the rest: python -m pytest -q
"""
import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import balto
from test_balto import SMOKE, interrupt_at_step_two, tiny_dir  # noqa: F401 (tiny_dir: a fixture)

spec = importlib.util.spec_from_file_location("report", Path(__file__).with_name("report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

VOID = {"meta", "br", "circle", "rect", "polyline", "img", "link", "input", "hr"}


class ReportParser(HTMLParser):
    """Collects token spans and checks that every opened tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.balanced, self.tokens, self.urls, self.tags = [], True, [], [], set()
        self.mode, self.token = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "div" and "data-mode" in attrs:
            self.mode = attrs["data-mode"]
        if tag == "span" and attrs.get("class") == "tok":
            self.token = {"mode": self.mode, "label": int(attrs["data-label"]),
                          "credit": float(attrs["data-credit"]), "style": attrs["style"], "text": ""}
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack.pop() != tag:
            self.balanced = False
        if tag == "span" and self.token is not None:
            self.tokens.append(self.token)
            self.token = None

    def handle_data(self, data):
        if self.token is not None:
            self.token["text"] += data


def parse(page):
    parser = ReportParser()
    parser.feed(page)
    parser.close()
    return parser


TEXT = "Lyon, 1968. It was founded by Tom."
OFFSETS = [[0, 4], [4, 5], [6, 10], [10, 11], [12, 14], [15, 18], [19, 26], [27, 29], [30, 33],
           [33, 34], [34, 34]]
LABELS = [1, 1, 1, 1, -1, -1, -1, -1, -1, -1, 0]
MIXED = {"row": 1, "id": "t1", "question": "Where & when?", "text": TEXT, "offsets": OFFSETS,
         "labels": LABELS, "claims": [[0, 11, 0.91, True], [12, 34, 0.12, False]],
         "spans": [[0, 11, 1], [12, 34, -1]], "tokens": [TEXT[s:e] for s, e in OFFSETS],
         "credit": [0.0] * 11}
# Supported throughout, but only the first claim answers: the second is beside the question.
ALL_SUPPORTED = {**MIXED, "row": 0, "labels": [1] * 4 + [0] * 7, "spans": [[0, 11, 1], [12, 34, 0]],
                 "claims": [[0, 11, 0.8, True], [12, 34, 0.7, True]]}
METRICS = {"faithfulness": 0.5, "informativeness": 0.4, "q_score": 0.44, "answer_recall": 0.25,
           "hallucination_rate": 0.6, "invented_rate": 0.2, "response_len": 20.0,
           "claims_per_response": 1.5, "copy_rate": 0.1, "bare_answer_rate": 0.05}


def evaluation(when, setting, prompts=8, shift=0.0):
    metrics = {k: v + shift for k, v in METRICS.items()}
    return {"event": "eval", "when": when, "setting": setting, **metrics,
            "interval": {k: [v - 0.1, v + 0.1] for k, v in metrics.items()}, "prompts": prompts}


def write_log(path, steps=3, finished=True, mixed=True, settings=("data_sample",)):
    """A log as balto.run writes it (G 2, lam 1), with hand-made rollouts: one eval line per setting."""
    config = {**vars(balto.Config()), "data": [f"data/{name}.jsonl" for name in settings],
              "group_size": 2, "lam": 1.0, "steps": 3, "reward": "answering",
              "provenance": {"commit": None, "device": "cpu"}}
    lines = [{"event": "config", **config}]
    lines += [evaluation("before", name, 8 + k) for k, name in enumerate(settings)]
    for s in range(1, steps + 1):
        lines.append({"event": "step", "step": s, "reward": 0.1 * s, "faithfulness": 0.5, "answering": s,
                      "kl": 0.01 * s, "sampling_drift": 0.001 * s, "response_len": 20 - s,
                      "plus_tokens": 10 + s, "minus_tokens": 10 - s, "example": ALL_SUPPORTED,
                      "rewards": [1.0, 0.5, 0.0, 0.5], "mixed": MIXED if mixed else None})
    if finished:
        lines += [evaluation("after", name, 8 + k, shift=0.1) for k, name in enumerate(settings)]
    path.mkdir(exist_ok=True)
    (path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_credit_of_each_mode_is_the_row_of_assign_credit_over_the_whole_group():
    """Recomputed from one row's labels and the group's rewards, as from the whole batch."""
    other = [1] * 3 + [0] * 8  # the group's other response, which the log does not keep
    labels, rewards = torch.tensor([other, LABELS]), torch.tensor([1.0, 0.5])
    credits = report.credit_under_every_mode(MIXED, [1.0, 0.5, 0.0, 0.5], 1, 2, lam=1.0)
    for mode in balto.CREDIT_MODES:
        expected = balto.assign_credit(mode, labels, torch.ones(2, 11), rewards, 2, 1.0)[1]
        torch.testing.assert_close(torch.tensor(credits[mode]), expected)
    assert report.credit_totals(LABELS, credits["balanced"]) == \
        "plus +1.000 neutral +0.000 minus -1.000"
    assert report.credit_totals(LABELS, credits["token"]) == \
        "plus +4.000 neutral +0.000 minus -6.000"


def test_page_shows_every_token_with_colours_that_follow_credit(tmp_path):
    page = report.report(write_log(tmp_path / "run"))
    parsed = parse(page)
    assert parsed.balanced and not parsed.stack and page.startswith("<!DOCTYPE html>")
    assert parsed.urls == [] and "script" not in parsed.tags and "link" not in parsed.tags
    assert "http://" not in page and "https://" not in page
    assert page.count("<svg") == 8 and "Where &amp; when?" in page and "Status: <b>finished</b>" in page
    assert "credit <b>balanced</b>, reward <b>answering</b>" in page
    credits = report.credit_under_every_mode(MIXED, [1.0, 0.5, 0.0, 0.5], 1, 2, lam=1.0)
    shown = [(s, e) for s, e in OFFSETS if e > s]
    for mode in balto.CREDIT_MODES:
        tokens = [t for t in parsed.tokens if t["mode"] == mode]
        assert [t["text"] for t in tokens] == [TEXT[s:e] for s, e in shown] * 3  # 3 steps, in order
        assert [round(t["credit"], 4) for t in tokens[:10]] == [round(c, 4) for c in credits[mode][:10]]
    for token in (t for t in parsed.tokens if t["mode"] == "balanced"):
        colour = {1: "rgba(22,163,74", -1: "rgba(220,38,38", 0: "rgb(229,231,235)"}[token["label"]]
        assert token["style"].startswith(f"background:{colour}")
    assert 'title="claim: p(supported) = 0.120 (unsupported)"' in page
    assert "total credit: plus +1.000 neutral +0.000 minus -1.000" in page
    assert "<td>faithfulness</td><td>0.500 [0.400, 0.600]</td><td>0.600 [0.500, 0.700]</td>" in page
    assert "<td>answer recall (stated)</td><td>0.250 [0.150, 0.350]</td>" in page  # the terminal's labels
    assert "q_score" not in page.split("<h2>Configuration")[0] and "key-term" not in page


def test_mixed_responses_are_shown_where_the_log_has_them(tmp_path):
    page = report.report(write_log(tmp_path / "mixed"))
    assert 'class="claim answers"' in page and 'class="claim unsupported"' in page
    page = report.report(write_log(tmp_path / "plain", mixed=False))  # fall back to the first row
    assert "claim unsupported" not in page and "this response: 1.00" in page
    assert 'class="claim beside" title="claim: p(supported) = 0.700 (beside the question)"' in page


def test_spans_are_outlined_by_label():
    abstains = {**MIXED, "text": "Lyon, 1968. The context does not say.", "claims": [[0, 11, 0.9, True]],
                "spans": [[0, 11, 1], [12, 37, -1]]}
    assert report.outlined_spans(abstains, "answering") == [
        (0, 11, "answers", "claim: p(supported) = 0.900 (answers)"),
        (12, 37, "unsupported", "abstention (wrong: the reference answers)")]
    talks = {**MIXED, "text": "The question asks where.", "claims": [], "spans": [[0, 24, -1]]}
    assert report.outlined_spans(talks, "answering") == [(0, 24, "unsupported", "talk (in place of an answer)")]
    assert report.outlined_spans(MIXED, "supported")[0] == \
        (0, 11, "supported", "claim: p(supported) = 0.910 (supported)")
    older = {k: v for k, v in MIXED.items() if k != "spans"}  # a log before spans: claims by verdict
    assert [name for _, _, name, _ in report.outlined_spans(older, "supported")] == \
        ["supported", "unsupported"]


def test_each_setting_has_its_own_table(tmp_path):
    page = report.report(write_log(tmp_path / "two", settings=("squad", "tatqa")))
    held_out = page.split("<h2>Held-out evaluation</h2>")[1].split("<h2>")[0]
    assert held_out.count("<table>") == 2 and held_out.count("<th>before</th><th>after</th>") == 2
    assert '<h3 class="setting">squad (8 prompts)</h3>' in held_out
    assert '<h3 class="setting">tatqa (9 prompts)</h3>' in held_out
    assert held_out.index("squad") < held_out.index("tatqa") and "Status: <b>finished</b>" in page


def test_rollouts_are_spread_over_the_run():
    steps = [{"step": s, "mixed": {**MIXED, "step": s}} for s in range(1, 11)]
    assert [record["step"] for record, _, _ in report.chosen_rollouts(steps)] == [1, 4, 7, 10]


def test_interrupted_log_and_bad_run_dirs(tmp_path, capsys):
    two = ("squad", "tatqa")
    page = report.report(write_log(tmp_path / "cut", steps=1, finished=False, settings=two))
    assert "Status: <b>stopped after step 1</b>" in page and parse(page).balanced
    assert page.count("<th>before</th></tr>") == 2 and "<th>after</th>" not in page
    log = write_log(tmp_path / "cut-in-after", settings=two) / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))  # tatqa's after never came
    assert "Status: <b>stopped after step 3</b>" in report.report(log.parent)
    for argv in ([str(tmp_path / "missing")], []):
        with pytest.raises(SystemExit) as exit_info:
            report.main(argv)
        assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_report_of_a_finished_and_an_interrupted_smoke_run(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path / "done"), *SMOKE])
    page = report.main([str(tmp_path / "done")]).read_text()
    assert parse(page).balanced and "Status: <b>finished</b>" in page and "<td>after</td>" not in page
    assert page.count('data-mode="balanced"') >= 1 and page.count("<th>before</th><th>after</th>") == 3
    assert all(f'<h3 class="setting">{name} (' in page for name in ("data_sample", "squad", "tatqa"))

    interrupt_at_step_two(monkeypatch)
    with pytest.raises(SystemExit):
        balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path / "cut"), *SMOKE])
    page = report.main([str(tmp_path / "cut")]).read_text()
    assert parse(page).balanced and "Status: <b>stopped after step 1</b>" in page
