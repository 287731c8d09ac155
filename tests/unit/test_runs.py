"""The run directory: atomic files (trainers/files.py), the metrics writer, resume truncation, progress lines,
output checks (trainers/runs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainers.errors import ConfigError
from trainers.files import atomic_write_json, atomic_write_text, replace_dir
from trainers.runs.metrics import MetricsWriter, read_metrics, truncate_metrics
from trainers.runs.outdir import check_output_dir
from trainers.runs.progress import progress_line
from trainers.runs.resume import check_run_shape, resume_hint
from trainers.runs.sinks import TensorBoardSink


def test_atomic_write_text_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write_text(target, Boom())  # fh.write rejects a non-str: the rename never happens
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_atomic_write_json_converts_tensors_and_non_finite_values(tmp_path):
    target = tmp_path / "s.json"
    atomic_write_json(
        target, {"loss": torch.tensor(1.5), "nan": float("nan"), "nested": {"x": [torch.tensor(2)]}}
    )
    assert json.loads(target.read_text()) == {"loss": 1.5, "nan": None, "nested": {"x": [2]}}


def test_replace_dir_swaps_whole_directories(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_text("old")
    tmp = tmp_path / "model.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    replace_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_check_output_dir_creates_nothing_and_rejects_files(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out == (tmp_path / "a" / "b").resolve()
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_dir(tmp_path / "file")


def test_check_output_dir_rejects_a_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_output_dir(tmp_path / "file" / "out")


def test_progress_line_has_step_loss_and_throughput():
    line = progress_line("sft", 12, 300, {"loss": 2.3141, "tokens_per_s": 9812.4, "lr": 9.8e-5, "epoch": 0})
    assert line == "sft step 12/300 loss 2.314 tokens/s 9,812 lr 9.800e-05"


def test_metrics_writer_appends_lines_and_tensorboard_events(tmp_path):
    writer = MetricsWriter(tmp_path, "sft", [TensorBoardSink(tmp_path)])
    writer.log(1, {"loss": 3.0, "epoch": 0})
    writer.log(2, {"loss": torch.tensor(2.5), "grad_norm": math.inf})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [{"step": 1, "loss": 3.0, "epoch": 0}, {"step": 2, "loss": 2.5, "grad_norm": None}]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_truncate_metrics_drops_steps_after_the_checkpoint_and_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo'
    )
    assert truncate_metrics(path, 3) == 3
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert truncate_metrics(path, 3) == 0
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0


def test_one_resume_wording_and_one_run_shape_check(tmp_path):
    assert (
        resume_hint(tmp_path / "iter_000002")
        == f"rerun the same command to resume from {tmp_path}/iter_000002"
    )
    assert resume_hint(None) == "no checkpoint was saved yet, so a rerun starts from the beginning"
    check_run_shape({"zero_stage": 3, "world_size": 2}, {"zero_stage": 3, "world_size": 2}, tmp_path)
    with pytest.raises(ConfigError) as err:
        check_run_shape({"zero_stage": 3, "world_size": 2}, {"zero_stage": 3, "world_size": 1}, "OUT")
    assert str(err.value) == (
        "OUT: checkpoints were made with world_size=2, this run has 1; resuming needs the same "
        "(pass --fresh to start over)"
    )
