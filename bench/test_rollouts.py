"""Checks of bench/rollouts.py and bench/steps.py's log reader on a hand-made log, plain and gzipped.
Run: python -m pytest -q bench/test_rollouts.py
"""
import doctest
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("rollouts", Path(__file__).with_name("rollouts.py"))
rollouts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rollouts)


def log_rows(steps):
    rows = [{"event": "config", "prompts_per_step": 1, "group_size": 2}]
    for step in range(1, steps + 1):
        claim = f"Step {step} says 8."
        text = claim + " Not 9."
        spans = [[0, len(claim), 1], [len(claim) + 1, len(text), -1]]
        example = {"question": f"Q{step}?", "text": text, "spans": spans,
                   "credit": [0.5, 0.5, -0.5]}
        rows.append({"event": "step", "step": step, "reward": 0.25, "example": example})
    return rows


@pytest.mark.parametrize("packed", [False, True])
def test_the_last_20_steps_with_their_marks(tmp_path, capsys, packed):
    text = "".join(json.dumps(row) + "\n" for row in log_rows(25))
    if packed:
        (tmp_path / "log.jsonl.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        (tmp_path / "log.jsonl").write_text(text, encoding="utf-8")
    lines = rollouts.main(str(tmp_path))
    assert len(lines) == 2 * rollouts.LAST + 1
    assert lines[-1] == "answering nothing: 0 of 20, talk in place of an answer: 0"
    assert lines[0] == "step 6 (mean reward 0.25, credit +0.50): Q6?"
    assert lines[1] == "    [+ Step 6 says 8. +] [- Not 9. -]"
    assert lines[-3].startswith("step 25 ")
    assert capsys.readouterr().out.splitlines() == lines


def test_marked_keeps_the_text_between_spans_and_puts_newlines_on_one_line():
    assert rollouts.marked("A.\nB is 3. C.", [[3, 10, 0]]) == "A. / [0 B is 3. 0] C."
    assert rollouts.marked("No claim.", []) == "No claim."


def test_the_worked_example_holds():
    assert doctest.testmod(rollouts).failed == 0


def test_a_folder_without_a_log_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        rollouts.main(str(tmp_path))
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path) in error and "log.jsonl" in error
