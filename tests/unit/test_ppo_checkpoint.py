"""trainers/ppo/checkpoint.py: checkpoint names, rotation, the resume point, the driver state and the run
shape a resumed run must share (no Ray: the DeepSpeed halves are tested in tests/integration/test_ppo.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainers.config import config_from_dict
from trainers.errors import ConfigError
from trainers.ppo import checkpoint
from trainers.runtime.zero import CHECKPOINT_TAG


def test_checkpoint_rotation_keeps_newest_complete(tmp_path):
    for it in (2, 4, 10):
        (tmp_path / checkpoint.checkpoint_name(it)).mkdir()
    (tmp_path / "iter_000012.tmp").mkdir()  # an interrupted write: never complete
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "iter_000002",
        "iter_000004",
        "iter_000010",
    ]
    checkpoint.rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000004", "iter_000010"]
    assert checkpoint.complete_checkpoints(tmp_path / "missing") == []


def test_resume_point_is_the_newest_complete_checkpoint_unless_fresh(tmp_path):
    """``rlhf ppo`` resumes from the newest complete checkpoint; ``--fresh`` ignores every checkpoint."""
    assert checkpoint.resume_point(tmp_path, fresh=False) is None
    for name in ("iter_000003", "iter_000010", "iter_000012.tmp", "iter_9"):
        (tmp_path / name).mkdir()
    assert checkpoint.newest_checkpoint(tmp_path) == tmp_path / "iter_000010"  # by number, not by name
    assert checkpoint.resume_point(tmp_path, fresh=False) == tmp_path / "iter_000010"
    assert checkpoint.resume_point(tmp_path, fresh=True) is None


def test_resume_with_another_run_shape_is_a_config_error(tmp_path):
    cfg = config_from_dict({})
    ckpt = tmp_path / checkpoint.checkpoint_name(3)
    ckpt.mkdir()
    state = checkpoint.DriverState(iteration=3, shape=checkpoint.run_shape(cfg))
    (ckpt / checkpoint.DRIVER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    checkpoint.check_resumable(ckpt, cfg)  # same shape: fine
    checkpoint.check_resumable(None, cfg)  # nothing to resume: fine
    cfg.ppo.adaptive_kl = True
    with pytest.raises(ConfigError, match="kl_controller=fixed"):
        checkpoint.check_resumable(ckpt, cfg)


def test_the_streak_round_trips_through_a_checkpoint_and_old_checkpoints_load():
    state = checkpoint.DriverState(iteration=3, nonfinite_streak={"policy": 2, "critic": 0})
    saved = json.loads(json.dumps(dataclasses.asdict(state)))
    assert checkpoint.DriverState(**saved).nonfinite_streak == {"policy": 2, "critic": 0}
    del saved["nonfinite_streak"]  # written before the field existed
    assert checkpoint.DriverState(**saved).nonfinite_streak == {}


def test_file_names_that_old_checkpoints_use():
    assert checkpoint.checkpoint_name(42) == "iter_000042"
    assert checkpoint.DRIVER_STATE_FILE == "driver_state.json"
    assert CHECKPOINT_TAG == "engine"  # DeepSpeed's tag folder of the policy and critic states


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_a_critic_free_run_shape_has_no_critic_workers(estimator):
    cfg = config_from_dict(
        {}, [f"ppo.advantage={estimator}", "ppo.samples_per_prompt=2", "ppo.critic_workers=2"]
    )
    assert checkpoint.run_shape(cfg)["critic_workers"] == 0  # critic_workers is unused without a critic
    assert checkpoint.run_shape(config_from_dict({}, ["ppo.critic_workers=2"]))["critic_workers"] == 2


def test_switching_a_run_between_gae_and_a_critic_free_estimator_is_refused_on_resume(tmp_path):
    gae = config_from_dict({})
    ckpt = tmp_path / checkpoint.checkpoint_name(2)
    ckpt.mkdir()
    state = checkpoint.DriverState(iteration=2, shape=checkpoint.run_shape(gae))
    (ckpt / checkpoint.DRIVER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    grpo = config_from_dict({}, ["ppo.advantage=grpo", "ppo.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match="critic_workers"):
        checkpoint.check_resumable(ckpt, grpo)
