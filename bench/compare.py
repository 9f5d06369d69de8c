"""Tabulate a comparison of modes: seed-averaged held-out metrics of each setting, and the primary
metric, with paired bootstrap intervals.

    python bench/compare.py runs/v4                    # every <mode>-s<seed>/metrics.json under it
    python bench/compare.py runs/v4 --pairs fspo:balanced,token:response
    python bench/compare.py runs/v4 --metric hallucination_rate   # rule 5's tie-break
    python bench/compare.py runs/v4 --settings squad              # one setting's differences
    python bench/compare.py bench/results/v6 --beside bench/results/v5=v5   # v5's runs as balanced-v5, ...
    python bench/compare.py bench/results/v7 --add bench/results/v9   # v9's runs as more seeds, new modes

A run directory is <mode>-s<seed>; `base` is the untrained policy (balto.py --steps 0: its metrics
are under "after"). A run scored before training too (v4's balanced-s0) gives the row "untrained".
Each run's evaluation keeps per-prompt counts (balto.PROMPT_COUNTS) for each
setting (a --data file). One bootstrap draw resamples each setting's held-out prompts on their own
and applies the same draw to every run, so the interval of a difference between two modes is paired:
prompt difficulty cancels, and what is left is the modes' own difference.

The primary metric is the mean over settings of Q (each setting's Q first, then their mean); --metric
puts another column of the tables in Q's place there (rule 5 breaks a tie on hallucination), and
--settings averages a chosen few (rule 5 reports where modes differ per setting). Its
paired differences (--pairs A:B,..., default every mode against balanced) say "differs" when the 95%
interval excludes 0 and every seed's difference (seeds matched by number) has the interval's sign.

An old metrics.json ("after" holds one setting's metrics: bench/results/v3) is read as the setting
data_sample; its answer recall is not known (v3 counted key-term recall there) and shows as "-".
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

KEYS = ["q_score", "hallucination_rate", "answer_recall", "informativeness", "copy_rate", "bare_answer_rate",
        "response_len"]
HEADS = ["Q", "hallucination", "answer recall", "informativeness (F1)", "copy rate", "bare answers", "tokens"]
RESAMPLES = 2000
OLD_SETTING = "data_sample"  # the one setting of a metrics.json written before --data took several files


def load(root: Path) -> tuple[dict, dict, set]:
    """{mode: {seed: {setting: (P, K) per-prompt counts}}}, {mode: [wall seconds]}, {(mode, seed) of
    old-format runs} from <mode>-s<seed> runs (any other directory name is seed 0)."""
    runs, walls, old = {}, {}, set()
    for path in sorted(root.glob("*/metrics.json")):
        match = re.fullmatch(r"(.+)-s(\d+)", path.parent.name)
        name, seed = (match.group(1), int(match.group(2))) if match else (path.parent.name, 0)
        metrics = json.loads(path.read_text())
        after = metrics["after"]
        before = metrics.get("before")
        if before and "per_prompt" not in before and "untrained" not in runs:  # scored before training
            runs["untrained"] = {0: {setting: torch.tensor(m["per_prompt"], dtype=torch.float64)
                                     for setting, m in before.items()}}
        if "per_prompt" in after:  # the old format: one setting, no name
            after = {OLD_SETTING: after}
            old.add((name, seed))
        runs.setdefault(name, {})[seed] = {setting: torch.tensor(m["per_prompt"], dtype=torch.float64)
                                           for setting, m in after.items()}
        out = path.parent.parent / (path.parent.name + ".out")
        timing = re.findall(r"^([\d.]+) s \d+ KB$", out.read_text(), flags=re.M) if out.exists() else []
        walls.setdefault(name, []).extend(float(t) for t in timing)
    return runs, walls, old


def seed_metrics(mode: str, per_seed: dict, picks: dict | None, old: set) -> dict[int, dict[str, dict]]:
    """Each seed's metrics of each setting, on the full held-out set (picks None) or on each resample
    (picks: {setting: (S, P)}). Answer recall is nan where the run is old (its column meant another thing)."""
    by_seed = {}
    for seed, settings in per_seed.items():
        by_seed[seed] = {}
        for setting, table in settings.items():
            metrics = balto.held_out_metrics(table.sum(0) if picks is None else table[picks[setting]].sum(1))
            if (mode, seed) in old:
                metrics["answer_recall"] = torch.full_like(metrics["q_score"], math.nan)
            by_seed[seed][setting] = metrics
    return by_seed


def primary(by_seed: dict, settings: list[str], key: str = "q_score") -> dict[int, torch.Tensor]:
    """Each seed's primary metric: the mean over settings of that setting's Q (or metric key)."""
    return {seed: torch.stack([m[s][key] for s in settings]).mean(0) for seed, m in by_seed.items()}


def seed_averaged(by_seed: dict, setting: str) -> dict[str, torch.Tensor]:
    return {key: torch.stack([m[setting][key] for m in by_seed.values()]).mean(0) for key in KEYS}


def interval(sample: torch.Tensor) -> tuple[float, float]:
    return float(sample.nanquantile(0.025)), float(sample.nanquantile(0.975))


def cell(value, sample, digits=3):
    if math.isnan(float(value)):
        return "-"
    low, high = interval(sample)
    return f"{float(value):.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def spread(values: list[float]) -> str:
    """Each seed's value and, over several seeds, their SD: the seed spread, a mode's stability."""
    q = torch.tensor(values, dtype=torch.float64)
    return ", ".join(f"{v:.3f}" for v in values) + (f" ({float(q.std()):.3f})" if len(q) > 1 else "")


UNTRAINED = ("base", "untrained")  # one policy, scored once: it pairs with every seed of a mode


def paired_seeds(runs: dict, a: str, b: str) -> list[tuple[int, int]]:
    """(seed of a, seed of b) matched by number; the untrained policy (one run) pairs with every seed."""
    if a in UNTRAINED or b in UNTRAINED:
        return [(sa, sb) for sa in runs[a] for sb in runs[b]]
    return [(s, s) for s in sorted(set(runs[a]) & set(runs[b]))]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Tabulate a comparison of modes (see the docstring).")
    parser.add_argument("root", nargs="?", default="runs/v3", help="a directory of <mode>-s<seed> runs")
    parser.add_argument("--beside", default="", metavar="DIR=TAG",
                        help="another comparison's runs, added as <mode>-TAG (the untrained row is the root's)")
    parser.add_argument("--add", default="", metavar="DIR",
                        help="more runs of the same comparison under their own names: new seeds or modes "
                             "(a mode's seed in both directories is an error; the untrained row is the root's)")
    parser.add_argument("--pairs", default="", help="A:B,C:D: the primary's paired differences A - B "
                                                    "(default: every mode against balanced)")
    parser.add_argument("--metric", default="q_score", choices=KEYS,
                        help="the metric averaged over settings as the primary (default: Q)")
    parser.add_argument("--settings", default="",
                        help="A,B: the settings the primary averages (default: every setting all runs have)")
    args = parser.parse_args(argv)
    runs, walls, old = load(Path(args.root))
    if not runs:
        parser.error(f"{args.root}: no */metrics.json")
    if args.add:
        more, more_walls, more_old = load(Path(args.add))
        if not more:
            parser.error(f"--add: {args.add}: no */metrics.json")
        for name in UNTRAINED:
            more.pop(name, None)
        for mode, per_seed in more.items():
            clash = set(per_seed) & set(runs.get(mode, {}))
            if clash:
                parser.error(f"--add: {mode} seed {min(clash)} is in both {args.root} and {args.add}")
            runs.setdefault(mode, {}).update(per_seed)
            walls.setdefault(mode, []).extend(more_walls.get(mode, []))
        old |= more_old
    if args.beside:
        other, _, tag = args.beside.rpartition("=")
        more, more_walls, more_old = load(Path(other))
        if not tag or not more:
            parser.error(f"--beside: {args.beside} is not DIR=TAG of a directory of <mode>-s<seed> runs")
        for name in UNTRAINED:  # the same policy and measure: the root's row stands
            more.pop(name, None)
        runs.update({f"{m}-{tag}": v for m, v in more.items()})
        walls.update({f"{m}-{tag}": v for m, v in more_walls.items()})
        old |= {(f"{m}-{tag}", seed) for m, seed in more_old}
    settings = sorted({s for per_seed in runs.values() for r in per_seed.values() for s in r})
    common = [s for s in settings if all(s in r for per_seed in runs.values() for r in per_seed.values())]
    if args.settings:
        chosen = args.settings.split(",")
        if not set(chosen) <= set(common):
            parser.error(f"--settings: {args.settings} is not a list of settings every run has ({', '.join(common)})")
        common = chosen
    prompts = {}
    for s in settings:
        sizes = {len(r[s]) for per_seed in runs.values() for r in per_seed.values() if s in r}
        if len(sizes) != 1:
            parser.error(f"setting {s}: runs held out different numbers of prompts {sorted(sizes)}: not paired")
        prompts[s] = sizes.pop()
    generator = torch.Generator().manual_seed(0)  # each setting's prompts resampled on their own
    picks = {s: torch.randint(prompts[s], (RESAMPLES, prompts[s]), generator=generator) for s in settings}
    per_seed_point = {m: seed_metrics(m, s, None, old) for m, s in runs.items()}
    per_seed_draws = {m: seed_metrics(m, s, picks, old) for m, s in runs.items()}
    seed_primary = {m: primary(v, common, args.metric) for m, v in per_seed_point.items()}
    point = {m: float(torch.stack(list(v.values())).mean()) for m, v in seed_primary.items()}
    draws = {m: torch.stack(list(primary(v, common, args.metric).values())).mean(0)
             for m, v in per_seed_draws.items()}

    # the untrained policy first, then each KL weight's runs by the primary metric
    order = sorted(runs, key=lambda m: (m != "base", "-kl" in m, -point[m]))
    if args.pairs:
        pairs = [tuple(pair.split(":", 1)) for pair in args.pairs.split(",")]
    else:  # every mode against balanced, where there is one
        pairs = [(m, "balanced") for m in order if m != "balanced" and "balanced" in runs]
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(runs):
            parser.error(f"--pairs: {':'.join(pair)} is not MODE:MODE of modes here ({', '.join(sorted(runs))})")

    print(", ".join(f"{s} {prompts[s]}" for s in settings) + f" held-out prompts; {RESAMPLES} paired bootstrap "
          "resamples (each setting's prompts on their own); mean over seeds [95% interval]")
    for s in settings:
        modes = [m for m in order if all(s in r for r in runs[m].values())]
        print(f"\n{s} ({prompts[s]} prompts):\n")
        print("| run | seeds | " + " | ".join(HEADS) + " | Q per seed (SD) |")
        print("| --- " * (len(KEYS) + 3) + "|")
        for m in modes:
            p, d = seed_averaged(per_seed_point[m], s), seed_averaged(per_seed_draws[m], s)
            q = [float(v[s]["q_score"]) for v in per_seed_point[m].values()]
            print(f"| {'untrained' if m == 'base' else m} | {len(runs[m])} | " + " | ".join(
                cell(p[k], d[k], 1 if k == "response_len" else 3) for k in KEYS) + f" | {spread(q)} |")

    name = HEADS[KEYS.index(args.metric)]
    print(f"\nPrimary: the mean over settings ({', '.join(common)}) of {name}\n")
    print("| run | seeds | primary | per seed (SD) | wall (min) |")
    print("| --- " * 5 + "|")
    for m in order:
        wall = f"{sum(walls[m]) / len(walls[m]) / 60:.1f}" if walls.get(m) else ""
        print(f"| {'untrained' if m == 'base' else m} | {len(runs[m])} | {cell(point[m], draws[m])} | "
              f"{spread([float(v) for v in seed_primary[m].values()])} | {wall} |")

    print("\nPaired differences of the primary (A - B), seed-averaged, with each seed's difference:\n")
    for a, b in pairs:
        if a not in UNTRAINED and b not in UNTRAINED and set(runs[a]) != set(runs[b]):
            print(f"  {a} - {b}: seeds {sorted(runs[a])} against {sorted(runs[b])}: incomplete, not compared")
            continue  # the means would average different seeds and the sign test only the shared ones
        low, high = interval(draws[a] - draws[b])
        seeds = paired_seeds(runs, a, b)
        per_seed = [float(seed_primary[a][sa] - seed_primary[b][sb]) for sa, sb in seeds]
        sign = 1 if low > 0 else -1 if high < 0 else 0  # the interval's sign; 0: it holds 0
        differs = sign != 0 and bool(per_seed) and all(x * sign > 0 for x in per_seed)
        named = ", ".join(f"s{sa if b in UNTRAINED else sb} {x:+.3f}" for (sa, sb), x in zip(seeds, per_seed))
        print(f"  {a} - {b}: {point[a] - point[b]:+.3f} [{low:+.3f}, {high:+.3f}]; per seed {named}: "
              f"{'differs' if differs else 'no difference'}")
    return point


if __name__ == "__main__":
    main()
