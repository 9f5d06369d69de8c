"""Tabulate a comparison of modes: seed-averaged held-out metrics with paired bootstrap intervals.

    python bench/compare.py runs/v3            # every <mode>-s<seed>/metrics.json under it

Each run's evaluation keeps per-prompt counts (balto.PROMPT_COUNTS). One bootstrap draw resamples the
held-out prompts once and applies the same draw to every run, so the interval of a difference between
two modes is paired: prompt difficulty cancels, and what is left is the modes' own difference.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

KEYS = ["q_score", "faithfulness", "informativeness", "key_term_recall", "hallucination_rate", "invented_rate",
        "response_len", "claims_per_response", "copy_rate", "bare_answer_rate"]
RESAMPLES = 2000


def load(root: Path) -> tuple[dict, dict]:
    """{mode: {seed: (P, K) per-prompt counts}}, {mode: [wall seconds]} from <mode>-s<seed> runs."""
    runs, walls = {}, {}
    for path in sorted(root.glob("*/metrics.json")):
        match = re.fullmatch(r"(.+)-s(\d+)", path.parent.name)
        name, seed = (match.group(1), int(match.group(2))) if match else (path.parent.name, 0)
        after = json.loads(path.read_text())["after"]
        runs.setdefault(name, {})[seed] = torch.tensor(after["per_prompt"], dtype=torch.float64)
        out = path.parent.parent / (path.parent.name + ".out")
        timing = re.findall(r"^([\d.]+) s \d+ KB$", out.read_text(), flags=re.M) if out.exists() else []
        walls.setdefault(name, []).extend(float(t) for t in timing)
    return runs, walls


def seed_metrics(per_seed: dict, picks: torch.Tensor | None) -> dict[int, dict[str, torch.Tensor]]:
    """Each seed's metrics, on the full held-out set (picks None) or on each resample (S, P)."""
    return {seed: balto.held_out_metrics(table.sum(0) if picks is None else table[picks].sum(1))
            for seed, table in per_seed.items()}


def seed_averaged(by_seed: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([v[key] for v in by_seed.values()]).mean(0) for key in KEYS}


def main(root: str) -> None:
    runs, walls = load(Path(root))
    prompts = len(next(iter(next(iter(runs.values())).values())))
    picks = torch.randint(prompts, (RESAMPLES, prompts), generator=torch.Generator().manual_seed(0))
    per_seed_point = {m: seed_metrics(s, None) for m, s in runs.items()}
    point = {m: seed_averaged(v) for m, v in per_seed_point.items()}
    draws = {m: seed_averaged(seed_metrics(s, picks)) for m, s in runs.items()}

    def cell(value, sample, digits=3):
        low, high = float(sample.nanquantile(0.025)), float(sample.nanquantile(0.975))
        return f"{float(value):.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    # the untrained policy first, then each KL weight's runs by mean Q
    order = sorted(runs, key=lambda m: (m != "base", "-kl" in m, -float(point[m]["q_score"])))
    print(f"{prompts} held-out prompts, {RESAMPLES} paired bootstrap resamples; mean over seeds [95% interval]\n")
    print("| run | seeds | Q | faithfulness | informativeness (F1) | key-term recall | hallucination | "
          "invented number/name | tokens | claims | copy rate | bare answers | Q per seed (SD) | wall (min) |")
    print("| --- " * 14 + "|")
    for m in order:
        p, d = point[m], draws[m]
        wall = f"{sum(walls[m]) / len(walls[m]) / 60:.1f}" if walls.get(m) else ""
        q = torch.stack([v["q_score"] for v in per_seed_point[m].values()])  # the seed spread: stability
        spread = ", ".join(f"{float(v):.3f}" for v in q) + (f" ({float(q.std()):.3f})" if len(q) > 1 else "")
        print(f"| {'untrained' if m == 'base' else m} | {len(runs[m])} | " + " | ".join(
            cell(p[k], d[k], 1 if k == "response_len" else 3) for k in KEYS) + f" | {spread} | {wall} |")
    print("\nPaired differences (row minus column's mode), seed-averaged, with the per-seed differences:\n")
    for key in ("q_score", "hallucination_rate", "informativeness"):
        print(f"{key}:")
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                if "base" in (a, b) or ("-kl" in a) != ("-kl" in b):  # compare like with like: one KL weight
                    continue
                diff = draws[a][key] - draws[b][key]
                low, high = float(diff.nanquantile(0.025)), float(diff.nanquantile(0.975))
                seeds = sorted(set(runs[a]) & set(runs[b]))
                per_seed = [float(per_seed_point[a][s][key] - per_seed_point[b][s][key]) for s in seeds]
                same_sign = all(x > 0 for x in per_seed) or all(x < 0 for x in per_seed)
                outside = (low > 0 or high < 0) and same_sign
                verdict = ("outside the noise" if outside else "no difference") if len(seeds) >= 3 else \
                    f"{len(seeds)} paired seed{'s' * (len(seeds) != 1)}: not decided by the rule"
                print(f"  {a} - {b}: {float(point[a][key] - point[b][key]):+.3f} [{low:+.3f}, {high:+.3f}]; "
                      f"per seed {', '.join(f'{x:+.3f}' for x in per_seed)}: {verdict}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/v3")
