"""trainers.stages.checkpoints: the resume point Ray Train registered, the run-shape check, RNG states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CONFIG
from trainers.config import load_config
from trainers.errors import ConfigError
from trainers.stages.checkpoints import (
    SNAPSHOT_FILE,
    TRAINER_STATE_FILE,
    check_resumable,
    latest_checkpoint_state,
    newest_checkpoint,
    rng_state,
    set_rng_state,
)
from trainers.stages.plan import make_plan
from trainers.stages.sft import SPEC as SFT_SPEC


def _checkpoint(storage, step, register=True):
    """A checkpoint folder; ``register``: also name it in Ray Train's snapshot as the latest."""
    path = storage / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / TRAINER_STATE_FILE).write_text(json.dumps({"step": step}))
    if register:
        snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": path.name, "metrics": {}}}
        (storage / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return path


def test_check_resumable_rejects_a_different_run_shape():
    cfg = load_config(TINY_CONFIG, ["model.tokenizer=/tok", "sft.micro_batch_size=8"])
    plan = make_plan(SFT_SPEC, cfg, Path("/o"), (3, 6, 6), "cpu", "fp32")
    shape = {"world_size": 2, "global_batch_size": 32, "micro_batch_size": 8, "zero_stage": 3}
    assert plan.run_shape() == shape
    check_resumable(None, plan)
    check_resumable(dict(shape, step=4), plan)
    with pytest.raises(ConfigError, match="world_size=1, this run has 2"):
        check_resumable(dict(shape, world_size=1), plan)


def test_the_resume_point_is_ray_trains_registered_checkpoint_not_the_newest_folder(tmp_path):
    """Workers outliving a killed driver can leave folders Ray Train never registered; it resumes from
    the one its snapshot names, and so must every message that says where a rerun resumes."""
    registered = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 6, register=False)
    assert newest_checkpoint(tmp_path) == registered
    assert latest_checkpoint_state(tmp_path) == {"step": 2}
    (tmp_path / SNAPSHOT_FILE).unlink()  # nothing registered yet: Ray Train starts over
    assert newest_checkpoint(tmp_path) is None and latest_checkpoint_state(tmp_path) is None


def test_rng_state_round_trips_so_dropout_continues_the_same_stream():
    torch.manual_seed(7)
    torch.rand(3)
    saved = rng_state()
    expected = torch.rand(4)
    torch.rand(10)  # move the stream on
    set_rng_state(saved)
    assert torch.equal(torch.rand(4), expected)
