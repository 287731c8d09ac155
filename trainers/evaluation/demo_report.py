"""The results of ``rlhf demo`` and ``rlhf pipeline``: one line per stage, the report summary from the
stage summaries, the closing lines. ``trainers.demo`` and ``trainers.pipeline`` run the stages; this
module only reads what they wrote (and writes the report through
:func:`trainers.evaluation.report.write_report`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainers.evaluation.report import write_report
from trainers.files import atomic_write_json

WIN_RATE_TARGET = 0.6
"""The demo shows that RLHF works when PPO-ptx beats SFT this often under the gold labeler."""


MODELS = ("base", "sft", "ppo_ptx")
"""Evaluated models, as named in the report."""


def stage_seconds(summary: Mapping, stage: str) -> float | None:
    value = summary.get(f"{stage}/wall_time_s")
    return float(value) if isinstance(value, int | float) else None


def result_line(stage: str, summary: Mapping, seconds: float | None = None) -> str:
    """The one line that states a stage's result (``seconds``: the demo's own measurement, else the
    stage's recorded wall time)."""
    s = summary
    seconds = seconds if seconds is not None else stage_seconds(s, stage)
    if stage == "world":
        rows = s["world/rows"]
        text = (
            f"world: {rows['demonstrations']['train']} demonstrations, {rows['comparisons']['train']} "
            f"comparisons, {rows['prompts']['train']} prompts, {rows['pretrain']['train']} pretraining "
            f"documents, {rows['heldout']} held-out"
        )
    elif stage in ("pretrain", "sft"):
        text = f"{'SFT' if stage == 'sft' else 'pretrain'}: valid loss {s[f'{stage}/valid_loss']:.3f}"
    elif stage == "rm":
        text = f"RM: valid accuracy {s['rm/valid_accuracy']:.3f}"
    elif stage == "ppo":
        head = (
            f"RM score {s['ppo/score_first_quarter']:.2f} -> {s['ppo/score_last_quarter']:.2f} "
            f"(first -> last quarter), last KL to SFT {s.get('ppo/objective/kl', float('nan')):.2f}"
        )
        ptx = s.get("ppo/loss/ptx")  # absent when the run had no ptx term
        text = f"PPO-ptx: {head}, ptx loss {ptx:.3f}" if ptx is not None else f"PPO: {head} (ptx off)"
    elif stage == "eval" and "eval/win_rate_gold" not in s:
        w = s["eval/win_rate_rm"]  # the pipeline on the user's data: no gold labeler
        text = (
            f"evaluation: RM win rate of PPO over SFT {w['win_rate']:.3f} [95% CI {w['ci_low']:.3f}, "
            f"{w['ci_high']:.3f}], mean RM score SFT {w['score_b']:.3f} -> PPO {w['score_a']:.3f}"
        )
    elif stage == "eval":
        w = s["eval/win_rate_gold"]
        g = s["eval/gold_scores"]
        text = (
            f"evaluation: gold win rate of PPO-ptx over SFT {w['win_rate']:.3f} "
            f"[95% CI {w['ci_low']:.3f}, {w['ci_high']:.3f}], gold score SFT {g['sft']['score']:.3f} -> "
            f"PPO-ptx {g['ppo_ptx']['score']:.3f}"
        )
    else:
        raise ValueError(f"no result line for stage {stage!r}")
    return text + (f" ({seconds:.0f} s)" if seconds is not None else "")


def kl_to_sft(records: Sequence[Mapping], key: str = "objective/kl") -> float | None:
    """Mean per-sequence KL to SFT over the last quarter of the PPO iterations (at least one): where
    the policy ended, smoothed over iteration noise. None without KL records."""
    values = [float(r[key]) for r in records if isinstance(r.get(key), int | float)]
    if not values:
        return None
    return statistics.fmean(values[-max(1, len(values) // 4) :])


def assemble_summary(
    summaries: Mapping[str, Mapping], ppo_records: Sequence[Mapping], timings: Mapping[str, float]
) -> dict:
    """The demo's report numbers from the stage summaries (``world`` ... ``eval``), the PPO metrics
    records and the per-stage seconds. Nested where it reads better (``pretrain_loss.base``)."""
    ev, rm, ppo = summaries["eval"], summaries["rm"], summaries["ppo"]
    gold, gold_scores = ev["eval/win_rate_gold"], ev["eval/gold_scores"]
    return {
        "gold_win_rate_vs_sft": gold["win_rate"],
        "gold_win_rate_ci95": [gold["ci_low"], gold["ci_high"]],
        "gold_win_rate_counts": {k: gold[k] for k in ("wins", "ties", "losses", "n")},
        "target_met": gold["win_rate"] >= WIN_RATE_TARGET,
        "rm_win_rate_vs_sft": ev["eval/win_rate_rm"]["win_rate"],
        "gold_score": {"sft": gold_scores["sft"]["score"], "ppo_ptx": gold_scores["ppo_ptx"]["score"]},
        "closing_rate": {"sft": gold_scores["sft"]["closing"], "ppo_ptx": gold_scores["ppo_ptx"]["closing"]},
        "correct_rate": {"sft": gold_scores["sft"]["correct"], "ppo_ptx": gold_scores["ppo_ptx"]["correct"]},
        "rm_valid_accuracy": rm["rm/valid_accuracy"],
        "rm_score": {
            "first_quarter": ppo["ppo/score_first_quarter"],
            "last_quarter": ppo["ppo/score_last_quarter"],
        },
        "kl_to_sft": kl_to_sft(ppo_records),
        "pretrain_loss": dict(ev["eval/pretrain_loss"]),
        "heldout_accuracy": dict(ev["eval/heldout_accuracy"]),
        "valid_loss": {
            "pretrain": summaries["pretrain"]["pretrain/valid_loss"],
            "sft": summaries["sft"]["sft/valid_loss"],
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "stages_total_s": round(sum(timings.values()), 1),
    }


def table_numbers(summary: Mapping) -> dict[str, float]:
    """The flat ``name: number`` view the report table and figure show (at most 16 numbers)."""
    flat = {"gold_win_rate_vs_sft": summary["gold_win_rate_vs_sft"]}
    for group in ("gold_score", "closing_rate"):
        flat |= {f"{group}/{k}": v for k, v in summary[group].items()}
    flat |= {
        "rm_win_rate_vs_sft": summary["rm_win_rate_vs_sft"],
        "rm_valid_accuracy": summary["rm_valid_accuracy"],
        "kl_to_sft": summary["kl_to_sft"],
    }
    flat |= {f"pretrain_loss/{k}": v for k, v in summary["pretrain_loss"].items()}
    flat |= {f"heldout_accuracy/{k}": summary["heldout_accuracy"][k] for k in MODELS}
    flat["stages_total_s"] = summary["stages_total_s"]
    return flat


def write_demo_report(out: Path, summary: Mapping, win_rates: Mapping[str, Mapping]) -> Path:
    """``OUT/report/``: :func:`trainers.evaluation.report.write_report` (prints the table), then the demo's own
    keys merged into the top level of ``report/summary.json``; returns that file's path."""
    metrics = out / "ppo" / "metrics.jsonl"
    paths = write_report(out, ppo_metrics_path=metrics, summary=table_numbers(summary), win_rates=win_rates)
    update_json(paths["summary"], summary)
    return paths["summary"]


def update_json(path: Path, values: Mapping) -> dict:
    """Merge ``values`` into the top level of the JSON object in ``path`` (atomically); the result."""
    merged = {**json.loads(path.read_text()), **values}
    atomic_write_json(path, merged)
    return merged


def closing_lines(summary: Mapping, out: Path) -> str:
    """Timings per stage, the total, the win-rate target and where the report is."""
    times = "  ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items())
    verdict = "met" if summary["target_met"] else "NOT met"
    return "\n".join(
        [
            f"timings: {times}",
            f"demo wall time: {summary['wall_time_s']:.0f} s (stages {summary['stages_total_s']:.0f} s)",
            f"target gold win rate >= {WIN_RATE_TARGET}: {verdict} ({summary['gold_win_rate_vs_sft']:.3f})",
            f"report: {out / 'report' / 'summary.json'}, {out / 'report' / 'report.png'}",
        ]
    )


# --------------------------------------------------------------------------------------------------
# rlhf pipeline: the user's model and data, judged by the RM
# --------------------------------------------------------------------------------------------------

RM_JUDGE_CAVEAT = (
    "the judge is the reward model PPO optimised, so this win rate is an optimistic bound; "
    "compare samples by hand or with another judge"
)
"""What the pipeline's report says about its RM-judged win rate."""


def assemble_pipeline_summary(
    summaries: Mapping[str, Mapping], ppo_records: Sequence[Mapping], timings: Mapping[str, float]
) -> dict:
    """The pipeline's report numbers from the stage summaries (``sft`` ... ``eval``), the PPO metrics
    records and the per-stage seconds: the RM win rate of PPO over SFT on held-out prompts with its
    interval and counts, each model's mean RM score there, the RM's validation accuracy, the RM score
    over PPO training, KL to SFT, the pretraining losses (None without held-out pretraining text)."""
    ev, rm, ppo = summaries["eval"], summaries["rm"], summaries["ppo"]
    w = ev["eval/win_rate_rm"]
    loss = ev.get("eval/pretrain_loss")
    return {
        "rm_win_rate_vs_sft": w["win_rate"],
        "rm_win_rate_ci95": [w["ci_low"], w["ci_high"]],
        "rm_win_rate_counts": {k: w[k] for k in ("wins", "ties", "losses", "n")},
        "rm_judge_caveat": RM_JUDGE_CAVEAT,
        "rm_mean_score": {"sft": w["score_b"], "ppo": w["score_a"]},
        "rm_valid_accuracy": rm["rm/valid_accuracy"],
        "rm_score": {
            "first_quarter": ppo["ppo/score_first_quarter"],
            "last_quarter": ppo["ppo/score_last_quarter"],
        },
        "kl_to_sft": kl_to_sft(ppo_records),
        "pretrain_loss": dict(loss) if loss is not None else None,
        "valid_loss": {"sft": summaries["sft"]["sft/valid_loss"]},
        "eval_prompts": ev["eval/prompts"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "stages_total_s": round(sum(timings.values()), 1),
    }


def pipeline_table_numbers(summary: Mapping) -> dict[str, float | None]:
    """The flat ``name: number`` view of :func:`assemble_pipeline_summary` for the report table/figure."""
    flat = {"rm_win_rate_vs_sft": summary["rm_win_rate_vs_sft"]}
    flat |= {f"rm_mean_score/{k}": v for k, v in summary["rm_mean_score"].items()}
    flat |= {
        "rm_valid_accuracy": summary["rm_valid_accuracy"],
        "rm_score/first_quarter": summary["rm_score"]["first_quarter"],
        "rm_score/last_quarter": summary["rm_score"]["last_quarter"],
        "kl_to_sft": summary["kl_to_sft"],
        "valid_loss/sft": summary["valid_loss"]["sft"],
    }
    flat |= {f"pretrain_loss/{k}": v for k, v in (summary["pretrain_loss"] or {}).items()}
    flat["stages_total_s"] = summary["stages_total_s"]
    return flat


def write_pipeline_report(out: Path, summary: Mapping, win_rates: Mapping[str, Mapping]) -> Path:
    """``OUT/report/`` as :func:`write_demo_report` writes it, from the pipeline's summary."""
    metrics = out / "ppo" / "metrics.jsonl"
    paths = write_report(
        out, ppo_metrics_path=metrics, summary=pipeline_table_numbers(summary), win_rates=win_rates
    )
    update_json(paths["summary"], summary)
    return paths["summary"]


def pipeline_closing_lines(summary: Mapping, out: Path) -> str:
    """Timings per stage, the total, the RM win rate with its caveat, and where the report is."""
    times = "  ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items())
    low, high = summary["rm_win_rate_ci95"]
    return "\n".join(
        [
            f"timings: {times}",
            f"pipeline wall time: {summary['wall_time_s']:.0f} s (stages {summary['stages_total_s']:.0f} s)",
            f"RM win rate of PPO over SFT: {summary['rm_win_rate_vs_sft']:.3f} "
            f"[95% CI {low:.3f}, {high:.3f}] ({RM_JUDGE_CAVEAT})",
            f"report: {out / 'report' / 'summary.json'}, {out / 'report' / 'report.txt'}, "
            f"{out / 'report' / 'report.png'}",
        ]
    )
