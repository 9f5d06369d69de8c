"""Checks of bench/compare.py on hand-made runs: the primary metric is the mean over settings of each
setting's Q, averaged over seeds, and a pair "differs" only when its interval excludes 0 and every
seed's difference has the interval's sign. Run: python -m pytest -q bench/test_compare.py
"""
import importlib.util
import json
from pathlib import Path

import pytest

import balto

spec = importlib.util.spec_from_file_location("compare", Path(__file__).with_name("compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def row(claims, supported, f1, stated=2.0, responses=4, tokens=80.0):
    """One prompt's counts over its 4 samples, in balto.PROMPT_COUNTS order (4 scored)."""
    counts = {"responses": responses, "claims": claims, "supported": supported,
              "hallucinated": min(claims - supported, responses), "invented": 0, "tokens": tokens,
              "scored": responses, "f1": f1, "stated": stated, "words": 50, "copied": 10, "bare": 0}
    return [float(counts[key]) for key in balto.PROMPT_COUNTS]


# The balanced runs' prompts: setting "alpha" has three, "beta" two.
ALPHA = [row(8, 6, 1.2), row(6, 3, 2.0), row(4, 4, 0.8)]
BETA = [row(5, 2, 1.6), row(7, 5, 2.4)]


def shifted(rows, supported=0, f1=0.0):
    """The same prompts with more (or fewer) supported claims and F1 on every one."""
    out = []
    for r in rows:
        c = dict(zip(balto.PROMPT_COUNTS, r))
        out.append(row(c["claims"], c["supported"] + supported, c["f1"] + f1))
    return out


RUNS = {  # run directory: {setting: per-prompt counts}
    "balanced-s0": {"alpha": ALPHA, "beta": BETA},
    "balanced-s1": {"alpha": shifted(ALPHA, f1=0.2), "beta": BETA},
    "response-s0": {"alpha": ALPHA, "beta": BETA},  # the same as balanced: no difference at all
    "response-s1": {"alpha": shifted(ALPHA, f1=0.2), "beta": BETA},
    "fspo-s0": {"alpha": shifted(ALPHA, 0, 1.0), "beta": shifted(BETA, 1, 1.0)},  # better on every prompt
    "fspo-s1": {"alpha": shifted(ALPHA, 0, 1.2), "beta": shifted(BETA, 1, 1.0)},
    "token-s0": {"alpha": shifted(ALPHA, 0, 1.5), "beta": shifted(BETA, 1, 1.5)},  # far better, then a bit worse
    "token-s1": {"alpha": shifted(ALPHA, 0, 0.1), "beta": shifted(BETA, 0, -0.1)},
}


def write_runs(root, runs=RUNS):
    for name, settings in runs.items():
        (root / name).mkdir(parents=True)
        after = {s: {"per_prompt": table} for s, table in settings.items()}
        (root / name / "metrics.json").write_text(json.dumps({"before": None, "after": after}))
    return root


def naive_q(table):
    claims = sum(r[balto.PROMPT_COUNTS.index("claims")] for r in table)
    supported = sum(r[balto.PROMPT_COUNTS.index("supported")] for r in table)
    f1 = sum(r[balto.PROMPT_COUNTS.index("f1")] for r in table)
    scored = sum(r[balto.PROMPT_COUNTS.index("scored")] for r in table)
    faithful, informative = supported / claims, f1 / scored
    return 2 * faithful * informative / (faithful + informative)


def naive_primary(mode):
    seeds = [settings for name, settings in RUNS.items() if name.rsplit("-s", 1)[0] == mode]
    return sum(sum(naive_q(t) for t in settings.values()) / len(settings) for settings in seeds) / len(seeds)


def verdicts(output):
    lines = [line.strip() for line in output.splitlines() if " - " in line and line.rstrip().endswith(
        ("differs", "no difference"))]
    return {line.split(":")[0]: line for line in lines}


def test_primary_is_the_seed_mean_of_the_mean_over_settings_of_q(tmp_path, capsys):
    point = compare.main([str(write_runs(tmp_path))])
    out = capsys.readouterr().out
    for mode in ("balanced", "response", "fspo", "token"):
        assert point[mode] == pytest.approx(naive_primary(mode), abs=1e-12)
    assert f"| fspo | 2 | {naive_primary('fspo'):.3f} [" in out.split("Primary:")[1]
    assert "alpha (3 prompts)" in out and "beta (2 prompts)" in out
    rows = [line.split(" | ") for line in out.split("Primary:")[0].splitlines() if line.startswith("| balanced |")]
    assert [cells[4] for cells in rows] == ["0.500 [0.500, 0.500]"] * 2  # 2 of 4 state the answer, every prompt


def test_differs_only_when_the_interval_excludes_0_and_every_seed_agrees(tmp_path, capsys):
    compare.main([str(write_runs(tmp_path))])
    found = verdicts(capsys.readouterr().out)
    assert set(found) == {"response - balanced", "fspo - balanced", "token - balanced"}  # the default pairs
    assert found["fspo - balanced"].endswith("differs")
    assert found["response - balanced"].endswith("no difference") and "+0.000 [+0.000, +0.000]" in \
        found["response - balanced"]
    token = found["token - balanced"]  # the interval excludes 0, but seed 1 goes the other way
    low = float(token.split("[")[1].split(",")[0])
    assert low > 0 and " s1 -" in token and token.endswith("no difference")

    compare.main([str(tmp_path), "--pairs", "balanced:fspo,token:response"])
    found = verdicts(capsys.readouterr().out)
    assert set(found) == {"balanced - fspo", "token - response"}
    assert found["balanced - fspo"].endswith("differs") and "s0 -" in found["balanced - fspo"]


def naive_hallucination(table):
    hallucinated = sum(r[balto.PROMPT_COUNTS.index("hallucinated")] for r in table)
    scored = sum(r[balto.PROMPT_COUNTS.index("scored")] for r in table)
    return hallucinated / scored


def test_metric_puts_another_column_in_qs_place(tmp_path, capsys):
    point = compare.main([str(write_runs(tmp_path)), "--metric", "hallucination_rate"])
    out = capsys.readouterr().out
    for mode in ("balanced", "fspo"):
        seeds = [settings for name, settings in RUNS.items() if name.rsplit("-s", 1)[0] == mode]
        want = sum(sum(naive_hallucination(t) for t in settings.values()) / len(settings)
                   for settings in seeds) / len(seeds)
        assert point[mode] == pytest.approx(want, abs=1e-12)
    assert point["fspo"] < point["balanced"]  # one more supported claim on every beta prompt
    assert "of hallucination" in out and verdicts(out)["fspo - balanced"].endswith("differs")


def test_settings_average_only_the_chosen_settings(tmp_path, capsys):
    point = compare.main([str(write_runs(tmp_path)), "--settings", "beta"])
    for mode in ("balanced", "fspo", "token"):
        seeds = [settings for name, settings in RUNS.items() if name.rsplit("-s", 1)[0] == mode]
        want = sum(naive_q(settings["beta"]) for settings in seeds) / len(seeds)
        assert point[mode] == pytest.approx(want, abs=1e-12)
    assert "settings (beta) of Q" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        compare.main([str(tmp_path), "--settings", "gamma"])
    assert error.value.code == 2


def test_the_untrained_policy_pairs_with_every_seed(tmp_path, capsys):
    write_runs(tmp_path)
    path = tmp_path / "balanced-s0" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["before"] = {s: {"per_prompt": shifted(m["per_prompt"], -1)} for s, m in metrics["after"].items()}
    path.write_text(json.dumps(metrics))  # balanced-s0 scored before training: the row "untrained"
    compare.main([str(tmp_path), "--pairs", "untrained:balanced,balanced:untrained"])
    found = verdicts(capsys.readouterr().out)
    assert " s0 -" in found["untrained - balanced"] and " s1 -" in found["untrained - balanced"]
    assert " s0 +" in found["balanced - untrained"] and " s1 +" in found["balanced - untrained"]


def test_an_old_metrics_json_is_the_setting_data_sample_without_answer_recall(tmp_path, capsys):
    for name, q in (("balanced-s0", ALPHA), ("fspo-s0", shifted(ALPHA, 0, 1.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"after": {"per_prompt": q, "prompts": 3}}))
    point = compare.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert point["fspo"] == pytest.approx(naive_q(shifted(ALPHA, 0, 1.0)))
    assert "data_sample (3 prompts)" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| balanced |", "| fspo |"))]
    assert [cells[4] for cells in rows if len(cells) > 8] == ["-", "-"]  # answer recall unknown


def test_unknown_pair_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(write_runs(tmp_path)), "--pairs", "fspo:nope"])
    assert exit_info.value.code == 2


def test_beside_adds_another_comparisons_runs_under_a_tag(tmp_path, capsys):
    now = write_runs(tmp_path / "v6", {name: RUNS[name] for name in ("balanced-s0", "balanced-s1")})
    before = write_runs(tmp_path / "v5", {"balanced-s0": RUNS["fspo-s0"], "balanced-s1": RUNS["fspo-s1"]})
    point = compare.main([str(now), "--beside", f"{before}=v5", "--pairs", "balanced-v5:balanced"])
    assert point["balanced-v5"] == pytest.approx(naive_primary("fspo"))
    assert point["balanced"] == pytest.approx(naive_primary("balanced"))
    assert "differs" in verdicts(capsys.readouterr().out)["balanced-v5 - balanced"]
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(now), "--beside", str(before)])  # no tag: the names would collide
    assert exit_info.value.code == 2


def test_add_puts_another_directorys_seeds_and_modes_beside_the_roots(tmp_path, capsys):
    split = {name: RUNS[name] for name in ("fspo-s1", "balanced-s1", "token-s0", "token-s1")}
    root = write_runs(tmp_path / "root", {n: t for n, t in RUNS.items() if n not in split})
    more = write_runs(tmp_path / "more", split)
    point = compare.main([str(root), "--add", str(more), "--pairs", "fspo:balanced,token:balanced"])
    whole = compare.main([str(write_runs(tmp_path / "whole")), "--pairs", "fspo:balanced,token:balanced"])
    assert point == pytest.approx(whole)
    assert point["fspo"] == pytest.approx(naive_primary("fspo"))  # seed 0 from root, seed 1 added
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(root), "--add", str(root)])  # every seed in both: refused
    assert exit_info.value.code == 2


def test_a_pair_whose_seeds_differ_is_not_compared(tmp_path, capsys):
    root = write_runs(tmp_path, {n: t for n, t in RUNS.items() if n != "balanced-s1"})
    compare.main([str(root), "--pairs", "fspo:balanced,token:response"])
    out = capsys.readouterr().out
    assert "fspo - balanced: seeds [0, 1] against [0]: incomplete, not compared" in out
    assert "differs" in verdicts(out)["token - response"] or "no difference" in verdicts(out)["token - response"]
