"""The run report: summary.json content, a real PNG, the text table, tolerant metrics reading."""

from __future__ import annotations

import json

import pytest

from trainers.errors import DataError
from trainers.evaluation import report
from trainers.evaluation.judges import win_rate_from_outcomes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def metrics_path(tmp_path):
    """Five PPO iterations with a null, missing keys and a line cut short at the end."""
    records = [
        {
            "step": 1,
            "objective/score": -0.5,
            "objective/kl": 0.0,
            "loss/ptx": 2.5,
            "rollout/response_length": 30,
        },
        {"step": 2, "objective/score": -0.1, "objective/kl": 0.4, "rollout/response_length": 28},
        {
            "step": 3,
            "objective/score": 0.2,
            "objective/kl": None,
            "loss/ptx": 2.6,
            "rollout/response_length": 27,
        },
        {"step": 4, "objective/score": 0.4, "objective/kl": 1.1},
        {
            "step": 5,
            "objective/score": 0.6,
            "objective/kl": 1.5,
            "loss/ptx": 2.7,
            "rollout/response_length": 25,
        },
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '\n{"step": 6, "objective/sc')
    return path


def test_curve_skips_missing_and_null_values(metrics_path):
    records = report.read_metrics(metrics_path)
    assert len(records) == 5  # blank and cut-short lines dropped
    assert report.curve(records, "objective/kl") == ([1.0, 2.0, 4.0, 5.0], [0.0, 0.4, 1.1, 1.5])
    assert report.curve(records, "loss/ptx") == ([1.0, 3.0, 5.0], [2.5, 2.6, 2.7])
    assert report.curve(records, "nope") == ([], [])


def test_curve_without_step_uses_line_number():
    assert report.curve([{"x": 3.0}, {"x": 4.0}], "x") == ([1.0, 2.0], [3.0, 4.0])
    assert report.curve([{"step": 0, "x": 1.0}], "x") == ([0.0], [1.0])


def test_write_report(tmp_path, metrics_path, capsys):
    summary = {"rm/accuracy": 0.71, "pretrain_loss/sft": 2.4, "pretrain_loss/ppo_ptx": 2.45}
    win_rates = {
        "PPO-ptx vs SFT": win_rate_from_outcomes([1.0] * 12 + [0.5] * 4 + [0.0] * 4),
        "PPO vs SFT": win_rate_from_outcomes([1.0] * 8 + [0.0] * 12),
    }
    paths = report.write_report(
        tmp_path / "run", ppo_metrics_path=metrics_path, summary=summary, win_rates=win_rates
    )
    out_dir = tmp_path / "run" / "report"
    assert paths == {
        "summary": out_dir / "summary.json",
        "png": out_dir / "report.png",
        "text": out_dir / "report.txt",
    }
    written = json.loads(paths["summary"].read_text())
    assert written["summary"] == summary
    assert written["win_rates"]["PPO-ptx vs SFT"]["win_rate"] == pytest.approx(0.7)
    assert set(written["win_rates"]) == set(win_rates)
    assert written["ppo"]["objective/score"] == {
        "first": -0.5, "last": 0.6, "min": -0.5, "max": 0.6, "iterations": 5
    }  # fmt: skip
    assert written["ppo"]["rollout/response_length"]["iterations"] == 4
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000  # a drawn figure, not an empty canvas
    printed = capsys.readouterr().out
    assert printed == paths["text"].read_text()
    assert "PPO-ptx vs SFT" in printed and "0.700 [" in printed and "W/T/L 12/4/4" in printed
    assert "rm/accuracy" in printed and "-0.5 -> 0.6" in printed


def test_write_report_without_metrics(tmp_path, capsys):
    paths = report.write_report(tmp_path, ppo_metrics_path=None, summary={}, win_rates={}, echo=False)
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert json.loads(paths["summary"].read_text()) == {"summary": {}, "win_rates": {}, "ppo": {}}
    assert capsys.readouterr().out == ""
    assert "(no PPO metrics)" in paths["text"].read_text()


def test_missing_metrics_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        report.write_report(tmp_path, ppo_metrics_path=tmp_path / "none.jsonl", summary={}, win_rates={})


EVAL_RECORDS = [
    {"step": 1, "objective/score": 0.1, "objective/kl": 0.0},
    {"step": 2, "objective/score": 0.2, "objective/kl": 0.5, "eval/score": 0.15, "eval/kl": 0.4},
    {"step": 3, "objective/score": 0.3, "objective/kl": 0.9},
    {"step": 4, "objective/score": 0.5, "objective/kl": 1.2, "eval/score": 0.35, "eval/kl": 1.0},
]
"""Evaluation every 2 iterations (ppo.eval_every=2): eval/* on iterations 2 and 4 only."""


def test_curve_summary_and_table_hold_the_held_out_curves_only_when_logged():
    curves = report.curve_summary(EVAL_RECORDS)
    assert curves["eval/score"] == {"first": 0.15, "last": 0.35, "min": 0.15, "max": 0.35, "iterations": 2}
    assert curves["eval/kl"]["last"] == 1.0 and curves["eval/kl"]["iterations"] == 2
    table = report.format_table({}, {}, curves)
    assert "eval/score" in table and "0.15 -> 0.35  (2 iterations)" in table and "eval/kl" in table
    without = report.curve_summary(
        [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in EVAL_RECORDS]
    )
    assert "objective/score" in without and not [k for k in without if k.startswith("eval/")]


def test_the_score_and_kl_panels_draw_the_held_out_curve_on_the_same_axis(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    report._plot_curve(ax, EVAL_RECORDS, "objective/score", "score", "eval/score")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"training rollouts", "held-out prompts"}
    assert list(lines["held-out prompts"].get_xdata()) == [2.0, 4.0]
    assert list(lines["held-out prompts"].get_ydata()) == [0.15, 0.35]
    assert ax.get_legend() is not None
    fig.clear()
    ax = fig.add_subplot()
    report._plot_curve(ax, EVAL_RECORDS[:1], "objective/score", "score", "eval/score")
    assert [line.get_label() for line in ax.get_lines()] == ["training rollouts"] and ax.get_legend() is None
    plt.close(fig)

    drawn = []
    real = report._plot_curve
    monkeypatch.setattr(
        report,
        "_plot_curve",
        lambda ax, recs, key, title, held=None: drawn.append((key, held)) or real(ax, recs, key, title, held),
    )
    report.plot_report(tmp_path / "r.png", EVAL_RECORDS, {}, {})
    assert drawn == [
        ("objective/score", "eval/score"),
        ("objective/kl", "eval/kl"),
        ("loss/ptx", None),
        ("rollout/response_length", None),
    ]
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
