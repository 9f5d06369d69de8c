"""The HTML report of a BALTO run, built from what the run wrote: RUN_DIR/log.jsonl.

    python tools/report.py runs/balto        # writes runs/balto/report.html

One self-contained page (no script, no network): a held-out table before and after training for each
setting (a --data file), curves over the logged steps, and logged rollouts coloured under every credit
mode of balto.py. A rollout's credit under each mode is recomputed with balto.assign_credit from its
logged token labels and its group's logged rewards r_i, before matched scaling, so the boxes show what
each formula does to the same labels: balanced moves +1 and -1 whatever the length, token moves as much
as there are tokens. Its spans are outlined by their label: +1 (answers; under --reward supported,
supported), 0 (beside the question), -1 (unsupported). Where the log has them, the rollouts shown are
mixed responses (a +1 and a -1 span): there the modes differ. Training does not change when a report
is wanted, and the log of an interrupted run gives a report marked "stopped after step N".
"""
from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def read_log(run_dir: Path) -> tuple[dict, list[dict], dict[str, dict[str, dict]]]:
    """(config, step records, evaluations {setting: {"before" / "after": metrics}}) from
    RUN_DIR/log.jsonl, settings in the order logged."""
    path = run_dir / "log.jsonl"
    rows = balto.read_jsonl(str(path), "log")  # errors name the file and the line
    config, steps, evals = None, [], {}
    for line_no, row in rows:
        if row.get("event") == "config":
            config = row
        elif row.get("event") == "step":
            if "rewards" not in row:
                raise balto.BaltoError(f"{path}:{line_no}: field 'rewards' is missing (a log written "
                                       "before the report moved to tools/report.py; rerun balto.py)")
            steps.append(row)
        elif row.get("event") == "eval":  # a log before --data took several files: one setting
            evals.setdefault(row.get("setting", "held-out"), {})[row["when"]] = row
    if config is None:
        raise balto.BaltoError(f"{path}:1: no config line (is this a balto.py log?)")
    return config, steps, evals


def credit_under_every_mode(example: dict, rewards: list[float], row: int, group_size: int,
                            lam: float) -> dict[str, list[float]]:
    """The credit of logged response `row` under every mode, before matched scaling (lam acts in
    balanced-group alone).

    Only the row's own labels and its group's rewards are needed: every mode's credit of a response
    depends on its own labels and length and, for the group modes, on its group's rewards r (the
    other rows' labels are zeros here and their credit is dropped).
    """
    first = row - row % group_size  # rows first .. first + G - 1 answer the same prompt
    labels = torch.zeros(group_size, len(example["labels"]), dtype=torch.long)  # (G, n)
    labels[row - first] = torch.tensor(example["labels"])
    mask = torch.ones_like(labels)  # the row's own tokens: the log keeps no padding
    group = torch.tensor(rewards[first:first + group_size])  # (G,)
    return {mode: balto.assign_credit(mode, labels, mask, group, group_size, lam)[row - first].tolist()
            for mode in balto.CREDIT_MODES}


def credit_totals(labels: list[int], credit: list[float]) -> str:
    """The credit a response carries on its +1 (plus), 0 (neutral) and -1 (minus) tokens."""
    sums = {name: sum(c for token_label, c in zip(labels, credit) if token_label == label)
            for label, name in balto.LABEL_NAMES.items()}
    return " ".join(f"{name} {value:+.3f}" for name, value in sums.items())


def chosen_rollouts(steps: list[dict], how_many: int = 4) -> list[tuple[dict, int, dict]]:
    """(step record, row, rollout) for up to how_many steps spread over the run: mixed responses
    (a +1 and a -1 span) where the log has any, else each step's first response."""
    logged = [(r, r["mixed"]["row"], r["mixed"]) for r in steps if r.get("mixed")]
    logged = logged or [(r, 0, r["example"]) for r in steps]
    if len(logged) <= how_many:
        return logged
    picks = sorted({round(k * (len(logged) - 1) / (how_many - 1)) for k in range(how_many)})
    return [logged[k] for k in picks]


def credit_colour(value: float, scale: float) -> str:
    """Diverging scale: green for positive credit, red for negative, grey for exactly zero."""
    if value == 0 or scale == 0:
        return "rgb(229,231,235)"
    r, g, b = (22, 163, 74) if value > 0 else (220, 38, 38)
    return f"rgba({r},{g},{b},{0.15 + 0.75 * min(1.0, abs(value) / scale):.2f})"


SPAN_CLASS = {1: "answers", 0: "beside", -1: "unsupported"}  # a span's label, under --reward answering
CLAIM_WORDS = {1: "answers", 0: "beside the question", -1: "unsupported"}
ABSTENTION_WORDS = {1: "right: the reference abstains too", 0: "no reference",
                    -1: "wrong: the reference answers"}
TALK_WORDS = {0: "the reference abstains", -1: "in place of an answer"}


def outlined_spans(example: dict, reward: str) -> list[tuple[int, int, str, str]]:
    """(start, end, class, hover text) of each labelled span: claims, abstentions and talk. A log
    from before spans were logged has its claims alone, +1 supported and -1 unsupported."""
    claims = {(cs, ce): p for cs, ce, p, _ in example["claims"]}
    spans = example.get("spans") or [[cs, ce, 1 if ok else -1] for cs, ce, _, ok in example["claims"]]
    out = []
    for start, end, label in spans:
        name = "supported" if reward == "supported" and label == 1 else SPAN_CLASS[label]
        if (start, end) in claims:
            word = "supported" if name == "supported" else CLAIM_WORDS[label]
            out.append((start, end, name, f"claim: p(supported) = {claims[start, end]:.3f} ({word})"))
        elif balto.is_abstention(example["text"][start:end]):
            out.append((start, end, name, f"abstention ({ABSTENTION_WORDS[label]})"))
        else:
            out.append((start, end, name, f"talk ({TALK_WORDS.get(label, label)})"))
    return out


def html_response(example: dict, credit: list[float], what: str = "credit",
                  reward: str = "answering") -> str:
    """One response: spans outlined by label (hover: verifier score), tokens coloured by credit, or by
    another per-token value named `what` (hover: label, value)."""
    text, scale = example["text"], max(map(abs, credit), default=0.0)
    spans = outlined_spans(example, reward)
    out, cursor, open_claim = [], 0, None
    for (s, e), label, value in zip(example["offsets"], example["labels"], credit):
        if e <= s:
            continue
        claim = next((k for k, (cs, ce, _, _) in enumerate(spans) if s < ce and e > cs), None)
        if claim != open_claim:
            if open_claim is not None:
                out.append("</span>")
            out.append(html.escape(text[cursor:s]))
            if claim is not None:
                _, _, name, hover = spans[claim]
                out.append(f'<span class="claim {name}" title="{html.escape(hover)}">')
            open_claim = claim
        else:
            out.append(html.escape(text[cursor:s]))
        out.append(f'<span class="tok" data-label="{label}" data-{what}="{value:.5f}" '
                   f'style="background:{credit_colour(value, scale)}" '
                   f'title="{balto.LABEL_NAMES[label]}, {what} {value:+.5f}">'
                   f'{html.escape(text[s:e])}</span>')
        cursor = e
    if open_claim is not None:
        out.append("</span>")
    out.append(html.escape(text[cursor:]))
    return "".join(out)


def svg_curve(title: str, xs: list[float], ys: list[float], width: int = 320, height: int = 140,
              pad: int = 24) -> str:
    """A small inline SVG line chart with its min and max labelled."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None and not math.isnan(y)]
    if not points:
        return f'<figure class="chart"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)

    def sx(x):
        return pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"><title>step {x:g}: {y:.4g}'
                   f"</title></circle>" for x, y in points)
    return (f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
            f'class="frame"/><polyline points="{line}" class="line"/>{dots}'
            f'<text x="2" y="{pad + 4}">{y1:.3g}</text><text x="2" y="{height - pad}">{y0:.3g}</text>'
            f'<text x="{pad}" y="{height - 6}">step {x0:g}</text>'
            f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{x1:g}</text></svg></figure>')


STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #111827; }
h1, h2, h3 { line-height: 1.2; } table { border-collapse: collapse; }
td, th { padding: 2px 10px; text-align: right; } th:first-child, td:first-child { text-align: left; }
tr:nth-child(even) { background: #f3f4f6; }
.modes { display: grid; grid-template-columns: repeat(2, 1fr); gap: 12px; }
.mode { border: 1px solid #d1d5db; border-radius: 6px; padding: 8px; }
.tok { border-radius: 2px; } .claim { border: 1.5px solid #6b7280; border-radius: 4px; padding: 1px 2px; }
.claim.unsupported { border-color: #b91c1c; border-style: dashed; }
.claim.supported, .claim.answers { border-color: #15803d; } .claim.beside { border-style: dotted; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; } .chart { margin: 0; }
.frame { fill: none; stroke: #d1d5db; } .line { fill: none; stroke: #2563eb; stroke-width: 1.5; }
svg text { font-size: 10px; fill: #4b5563; } .legend span { padding: 0 6px; margin-right: 6px; }
pre { background: #f3f4f6; padding: 8px; overflow-x: auto; }
"""
LEGEND = (
    '<p class="legend">Token colour = credit under that formula, before matched scaling: '
    '<span style="background:rgba(22,163,74,.6)">positive</span><span style="background:'
    'rgba(220,38,38,.6)">negative</span><span style="background:rgb(229,231,235)">zero</span>. '
    "Intensity is relative to the largest |credit| in that box. Outlined: a claim or an abstention, "
    "by its label (solid green +1: answers the question, or under --reward supported is supported; "
    "dotted grey 0: supported but beside the question; dashed red -1: unsupported, or a wrong "
    "abstention). Hover a token for its label and credit, a claim for its verifier score.</p>")
CURVES = [("reward (mean r_i)", "reward"), ("faithfulness of rollouts", "faithfulness"),
          ("answering spans (+1)", "answering"), ("KL (k3)", "kl"),
          ("response length (tokens)", "response_len"), ("+1 tokens", "plus_tokens"),
          ("-1 tokens", "minus_tokens"), ("sampling drift", "sampling_drift")]


def lean_by_label(steps: list[dict]) -> str:
    """TPO runs: the mean s (log-prob with the context minus without) of the logged tokens, by label."""
    sums = {label: [0.0, 0] for label in balto.LABEL_NAMES}
    for record in steps:
        examples = [record["example"]] + ([record["mixed"]] if record.get("mixed") else [])
        for example in examples:
            for label, value in zip(example["labels"], example["s"]):
                sums[label][0] += value
                sums[label][1] += 1
    rows = "".join(f"<tr><td>{balto.LABEL_NAMES[label]}</td><td>{total / n if n else float('nan'):+.3f}</td>"
                   f"<td>{n}</td></tr>" for label, (total, n) in sums.items())
    return ("<h2>What TPO sees</h2><p>s = log pi(token | context) - log pi(token | no context): how much a "
            "token leans on the context, by the policy of that step. Mean over the logged tokens of every "
            "step, by the verifier's label (TPO itself never sees the labels):</p>"
            f"<table><tr><th>label</th><th>mean s</th><th>tokens</th></tr>{rows}</table>")


def held_out_table(setting: str, evals: dict[str, dict]) -> str:
    """One setting's table: a column for each evaluation logged (before, after)."""
    prompts = next(iter(evals.values()))["prompts"]
    head = "".join(f"<th>{when}</th>" for when in evals)
    shown = [(label, key) for label, key in balto.HELD_OUT_METRICS  # older logs lack newer metrics
             if all(key in e for e in evals.values())]
    rows = "".join(f"<tr><td>{'&emsp;' * label.startswith(' ')}{html.escape(label.strip())}</td>"
                   + "".join(f"<td>{balto.with_interval(e, key)}</td>" for e in evals.values())
                   + "</tr>" for label, key in shown)
    return (f'<h3 class="setting">{html.escape(setting)} ({prompts} prompts)</h3>'
            f"<table><tr><th>metric</th>{head}</tr>{rows}</table>")


def report(run_dir: Path) -> str:
    """The whole page as one string."""
    config, steps, evals = read_log(run_dir)
    data = [config["data"]] if isinstance(config["data"], str) else config["data"]
    by_setting = any("setting" in e for by_when in evals.values() for e in by_when.values())
    settings = [Path(path).stem for path in data] if by_setting else list(evals)  # all to be scored
    finished = bool(settings) and all("after" in evals.get(name, {}) for name in settings)
    status = "finished" if finished else f"stopped after step {len(steps)}"
    reward = config.get("reward", "supported")  # a log before --reward: +1 meant supported
    if "objective" in config:  # a peer's run (peers/tpo.py, peers/tlpo.py)
        method = f"objective <b>{html.escape(config['objective'])}</b>"
    else:
        method = f"credit <b>{html.escape(config['credit'])}</b>"
    method += f", reward <b>{html.escape(reward)}</b>"
    shows_lean = bool(steps) and "s" in steps[0]["example"]
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>BALTO report'
             f"</title><style>{STYLE}</style></head><body><h1>BALTO run report</h1>"
             f"<p>Status: <b>{html.escape(status)}</b>. Policy {html.escape(config['model'])}, "
             f"{method}, {len(steps)} of {config['steps']} "
             f"steps logged, from {html.escape(str(run_dir / 'log.jsonl'))}.</p>"]
    parts.append("<h2>Held-out evaluation</h2>")
    if evals:
        parts.append("<p>Each setting (a --data file) held out and scored on its own; 95% bootstrap "
                     "intervals over prompts.</p>")
        parts += [held_out_table(setting, by_when) for setting, by_when in evals.items()]
    else:
        parts.append("<p>No evaluation logged yet.</p>")
    step_numbers = [r["step"] for r in steps]
    parts += ['<h2>Curves over steps</h2><div class="charts">',
              *(svg_curve(title, step_numbers, [r.get(key) for r in steps]) for title, key in CURVES),
              "</div>", "<h2>Logged rollouts under every credit mode</h2>", LEGEND]
    group_size, lam = config["group_size"], config["lam"]
    for record, row, example in chosen_rollouts(steps):
        step, rewards = record["step"], record["rewards"]
        credits = credit_under_every_mode(example, rewards, row, group_size, lam)
        first = row - row % group_size
        group = ", ".join(f"{r:.2f}" for r in rewards[first:first + group_size])
        parts.append(f"<h3>Step {step}, {html.escape(example['id'])}: "
                     f"{html.escape(example['question'])}</h3><p>Group rewards r: {group} "
                     f"(this response: {rewards[row]:.2f}).</p><div class=\"modes\">")
        if shows_lean:
            parts.append(f'<div class="mode" data-mode="tpo-s"><b>s: lean on the context (this run: TPO)</b><br>'
                         f'{html_response(example, example["s"], what="s", reward=reward)}</div>')
        for mode in balto.CREDIT_MODES:
            marker = " (this run)" if mode == config["credit"] and "objective" not in config else ""
            parts.append(f'<div class="mode" data-mode="{mode}"><b>{mode}{marker}</b> '
                         f'<small class="totals">total credit: '
                         f'{credit_totals(example["labels"], credits[mode])}</small><br>'
                         f"{html_response(example, credits[mode], reward=reward)}</div>")
        parts.append("</div>")
    if not steps:
        parts.append("<p>No step logged yet.</p>")
    if shows_lean:
        parts.append(lean_by_label(steps))
    settings = {k: v for k, v in config.items() if k != "event"}
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(json.dumps(settings, indent=2))}</pre>")
    return "".join(parts) + "</body></html>\n"


def main(argv: list[str] | None = None) -> Path:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python tools/report.py RUN_DIR   (writes RUN_DIR/report.html)", file=sys.stderr)
        raise SystemExit(2)
    run_dir = Path(args[0])
    try:
        page = report(run_dir)
    except balto.BaltoError as err:
        print(f"report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
