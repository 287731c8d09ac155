"""trainers.stages.plan: the frozen StagePlan the driver builds once and every Ray Train worker receives."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import ray.cloudpickle

from tests.conftest import REPO, TINY_CONFIG
from trainers.config import RMConfig, load_config, to_dict
from trainers.stages.plan import StagePlan, make_plan
from trainers.stages.rm import SPEC as RM_SPEC
from trainers.stages.rm import RMTask


def _plan(*overrides: str) -> tuple[StagePlan, object]:
    cfg = load_config(TINY_CONFIG, ["model.tokenizer=tok", "model.path=runs/sft/model", *overrides])
    return make_plan(RM_SPEC, cfg, Path("/o/rm"), (5, 15, 12), "cpu", "fp32"), cfg


def test_the_plan_carries_the_task_class_typed_sections_and_absolute_paths(monkeypatch):
    monkeypatch.chdir(REPO)
    plan, cfg = _plan("rm.lr=1e-4", "logging.log_every=3")
    assert plan.stage == "rm" and plan.task is RMTask  # no registry lookup on the worker
    assert isinstance(plan.stage_cfg, RMConfig) and plan.stage_cfg.lr == 1e-4
    assert plan.logging.log_every == 3 and plan.model.max_len == cfg.model.max_len
    assert plan.model.path == str(REPO / "runs/sft/model") and cfg.model.path == "runs/sft/model"
    assert plan.tokenizer_dir == REPO / "tok" and plan.out_dir == Path("/o/rm")
    assert (plan.steps_per_epoch, plan.schedule_steps, plan.stop_step) == (5, 15, 12)
    assert (plan.device, plan.dtype, plan.torch_threads) == ("cpu", "fp32", cfg.cluster.torch_threads)
    assert plan.run_config == to_dict(cfg) and plan.data_ref is None
    assert plan.world_size == cfg.rm.num_workers


def test_the_plan_is_frozen_and_does_not_follow_later_config_changes():
    plan, cfg = _plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.stop_step = 1  # type: ignore[misc]
    cfg.rm.lr, cfg.logging.log_every, cfg.model.dropout = 9.0, 99, 0.5
    assert plan.stage_cfg.lr != 9.0 and plan.logging.log_every != 99 and plan.model.dropout != 0.5


def test_the_plan_survives_rays_pickling_unchanged():
    plan, _ = _plan()
    assert pickle.loads(ray.cloudpickle.dumps(plan)) == plan
