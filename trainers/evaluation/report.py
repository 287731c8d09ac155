"""The run report: PPO curves, win rates with confidence intervals, the summary numbers.

    from trainers.evaluation.report import write_report
    write_report("runs/demo", ppo_metrics_path="runs/demo/ppo/metrics.jsonl",
                 summary={"rm/accuracy": 0.71, "pretrain_loss/ppo_ptx": 2.31, ...},
                 win_rates={"PPO-ptx vs SFT": judges.win_rate(...), ...})

writes ``OUT/report/summary.json`` (``{"summary": ..., "win_rates": ..., "ppo": {metric: {first, last,
min, max, iterations}}}``), ``OUT/report/report.png`` and ``OUT/report/report.txt`` (the plain-text
table, also printed). The figure has one panel per PPO curve (:data:`CURVES`, read from the PPO
stage's ``metrics.jsonl``: one JSON object per iteration, ``step`` = iteration; missing keys, nulls
and a line cut short by a crash are skipped; with ``ppo.eval_every`` the held-out curves of
:data:`EVAL_CURVES` share the panel of their training curve), a panel of win-rate bars with their 95%
intervals around the 0.5 line, and a panel listing the summary numbers. matplotlib runs on the Agg
backend (no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from trainers.errors import DataError
from trainers.files import atomic_write_json, atomic_write_text
from trainers.runs.metrics import read_metrics

CURVES: tuple[tuple[str, str], ...] = (
    ("objective/score", "score (reward sources)"),
    ("objective/kl", "KL to SFT (per sequence, nats)"),
    ("loss/ptx", "pretraining loss (ptx term)"),
    ("rollout/response_length", "response length (tokens)"),
)
"""PPO metrics drawn as curves over iterations, with their panel titles."""
EVAL_CURVES: tuple[tuple[str, str], ...] = (
    ("eval/score", "objective/score"),
    ("eval/kl", "objective/kl"),
)
"""Evaluation-while-training metrics (``ppo.eval_every``: held-out prompts, logged every N iterations)
and the training curve whose panel each one shares, so train and held-out read on one axis."""
MAX_SUMMARY_LINES = 16
"""The summary panel lists at most this many numbers (the table and JSON hold all)."""


def _number(value) -> float | None:
    """``value`` as a finite float, else None (missing, null, text, nan)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(iterations, values)`` of one metric; x is ``step`` when present, else the line number (1-based)."""
    xs, ys = [], []
    for i, record in enumerate(records):
        y = _number(record.get(key))
        if y is not None:
            step = _number(record.get("step"))
            xs.append(step if step is not None else float(i + 1))
            ys.append(y)
    return xs, ys


def curve_summary(records: list[dict]) -> dict[str, dict]:
    """``first``, ``last``, ``min``, ``max`` and ``iterations`` of every :data:`CURVES` and
    :data:`EVAL_CURVES` metric with data (``iterations``: how many iterations logged it)."""
    out = {}
    for key in [k for k, _ in CURVES] + [k for k, _ in EVAL_CURVES]:
        _, ys = curve(records, key)
        if ys:
            out[key] = {"first": ys[0], "last": ys[-1], "min": min(ys), "max": max(ys), "iterations": len(ys)}
    return out


def _fmt(value) -> str:
    """A number in 4 significant digits; anything else as text."""
    number = _number(value)
    return f"{number:.4g}" if number is not None and not isinstance(value, int) else str(value)


def format_table(summary: Mapping, win_rates: Mapping[str, Mapping], curves: Mapping[str, Mapping]) -> str:
    """The plain-text report: summary numbers, win rates with intervals, PPO first -> last values."""
    lines = ["ray-rlhf report", "", "summary"]
    width = max([len(str(k)) for k in summary] + [len(k) for k in win_rates] + [len(k) for k in curves] + [8])
    lines += [f"  {str(k):<{width}}  {_fmt(v)}" for k, v in summary.items()] or ["  (none)"]
    lines += ["", "win rates (ties count half; 95% Wilson interval)"]
    for name, r in win_rates.items():
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if "ci_low" in r else ""
        counts = f"n={r.get('n', '?')} W/T/L {r.get('wins', '?')}/{r.get('ties', '?')}/{r.get('losses', '?')}"
        lines.append(f"  {name:<{width}}  {r['win_rate']:.3f} {ci}  {counts}")
    if not win_rates:
        lines.append("  (none)")
    lines += ["", "PPO curves (first -> last)"]
    for key, c in curves.items():
        lines.append(
            f"  {key:<{width}}  {_fmt(c['first'])} -> {_fmt(c['last'])}  ({c['iterations']} iterations)"
        )
    if not curves:
        lines.append("  (no PPO metrics)")
    return "\n".join(lines) + "\n"


def _plot_curve(ax, records: list[dict], key: str, title: str, held_out: str | None = None) -> None:
    """One metric over PPO iterations, with its held-out counterpart ``held_out`` (an
    :data:`EVAL_CURVES` key) on the same axis when the run logged it; a 'no data' note when neither."""
    xs, ys = curve(records, key)
    eval_xs, eval_ys = curve(records, held_out) if held_out is not None else ([], [])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("PPO iteration", fontsize=8)
    ax.grid(alpha=0.3)
    if ys:
        ax.plot(
            xs,
            ys,
            marker="o" if len(ys) < 30 else None,
            markersize=3,
            linewidth=1.5,
            label="training rollouts",
        )
    if eval_ys:  # sparse (every ppo.eval_every iterations): always marked
        ax.plot(
            eval_xs,
            eval_ys,
            marker="s",
            markersize=4,
            linewidth=1.5,
            linestyle="--",
            label="held-out prompts",
        )
        ax.legend(fontsize=7)
    if not ys and not eval_ys:
        ax.text(
            0.5, 0.5, f"no '{key}' in metrics", ha="center", va="center", transform=ax.transAxes, fontsize=9
        )


def _plot_win_rates(ax, win_rates: Mapping[str, Mapping]) -> None:
    """Horizontal bars of win rates with their 95% interval, and the 0.5 (no difference) line."""
    ax.set_title("win rate (95% CI)", fontsize=10)
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    if not win_rates:
        ax.text(0.5, 0.5, "no win rates", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    names = list(win_rates)
    rates = [win_rates[n]["win_rate"] for n in names]
    lows = [r - win_rates[n].get("ci_low", r) for n, r in zip(names, rates)]
    highs = [win_rates[n].get("ci_high", r) - r for n, r in zip(names, rates)]
    positions = list(range(len(names)))[::-1]  # first entry on top
    ax.barh(positions, rates, xerr=[lows, highs], capsize=4, color="tab:blue", alpha=0.8)
    ax.set_yticks(positions, names, fontsize=8)
    for y, r, high in zip(positions, rates, highs):
        ax.text(min(r + high + 0.02, 0.92), y, f"{r:.2f}", va="center", fontsize=8)


def _plot_summary(ax, summary: Mapping) -> None:
    """The summary numbers as a text panel."""
    ax.axis("off")
    ax.set_title("summary", fontsize=10)
    items = [(k, v) for k, v in summary.items() if _number(v) is not None][:MAX_SUMMARY_LINES]
    text = "\n".join(f"{k}: {_fmt(v)}" for k, v in items) or "(none)"
    ax.text(0.0, 1.0, text, va="top", ha="left", family="monospace", fontsize=8, transform=ax.transAxes)


def plot_report(
    path: str | Path, records: list[dict], summary: Mapping, win_rates: Mapping[str, Mapping]
) -> None:
    """Draw the 2 x 3 report figure into ``path`` (PNG): four curves (score and KL with their held-out
    curves when logged), then win rates, then the summary."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CPU boxes and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    held_out = {train: key for key, train in EVAL_CURVES}
    for ax, (key, title) in zip(axes.flat, CURVES):
        _plot_curve(ax, records, key, title, held_out.get(key))
    _plot_win_rates(axes[1, 1], win_rates)
    _plot_summary(axes[1, 2], summary)
    fig.suptitle("ray-rlhf: PPO-ptx run report", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")  # then renamed: a reader never sees half a PNG
    plt.close(fig)
    os.replace(tmp, path)


def write_report(
    out_dir: str | Path,
    *,
    ppo_metrics_path: str | Path | None,
    summary: Mapping,
    win_rates: Mapping[str, Mapping],
    echo: bool = True,
) -> dict[str, Path]:
    """Write ``OUT/report/{summary.json, report.png, report.txt}``; print the table when ``echo``.

    ``summary``: any flat mapping of names to numbers (RM accuracy, KL, pretraining losses...).
    ``win_rates``: name -> a :func:`trainers.judges.win_rate` result (``win_rate``, ``ci_low``,
    ``ci_high``, counts). ``ppo_metrics_path`` None draws no curves. Returns the written paths.
    """
    report = Path(out_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    if ppo_metrics_path is not None and not Path(ppo_metrics_path).is_file():
        raise DataError(f"PPO metrics file '{ppo_metrics_path}' does not exist")
    records = read_metrics(ppo_metrics_path) if ppo_metrics_path is not None else []
    curves = curve_summary(records)
    paths = {"summary": report / "summary.json", "png": report / "report.png", "text": report / "report.txt"}
    atomic_write_json(
        paths["summary"], {"summary": dict(summary), "win_rates": dict(win_rates), "ppo": curves}
    )
    plot_report(paths["png"], records, summary, win_rates)
    table = format_table(summary, win_rates, curves)
    atomic_write_text(paths["text"], table)
    if echo:
        print(table, end="")
    return paths
