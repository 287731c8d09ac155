"""trainers.runtime.zero pure helpers: LR schedule, DeepSpeed config, accumulation, parameter groups."""

from __future__ import annotations

import pytest
import torch

from trainers.runtime.zero import (
    PERSIST_ALL_BELOW_BYTES,
    PERSIST_ALL_THRESHOLD,
    ds_config,
    grad_accum_steps,
    lr_lambda,
    param_groups,
    persists_whole,
    warmup_steps_for,
)


def test_lr_warmup_is_linear_and_starts_above_zero():
    values = [lr_lambda(s, total_steps=100, warmup_steps=4, min_lr_ratio=0.1) for s in range(4)]
    assert values == [0.25, 0.5, 0.75, 1.0]


def test_lr_cosine_goes_from_peak_to_floor_at_the_last_step():
    total, warmup, floor = 20, 3, 0.1  # 16 decay steps after the warm-up: progress = (step - 3) / 16
    assert lr_lambda(warmup, total, warmup, floor) == pytest.approx(1.0)
    assert lr_lambda(total - 1, total, warmup, floor) == pytest.approx(floor)
    # Halfway through the decay the cosine term is 0: exactly halfway between peak and floor.
    assert lr_lambda(11, total, warmup, floor) == pytest.approx(0.55)
    # A quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2 = 0.1 + 0.45 * 1.7071068 (worked by hand).
    assert lr_lambda(7, total, warmup, floor) == pytest.approx(0.8681981, abs=1e-7)
    decay = [lr_lambda(s, total, warmup, floor) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_lambda(total + 5, total, warmup, floor) == pytest.approx(floor)


def test_lr_without_warmup_starts_at_peak():
    assert lr_lambda(0, 10, 0, 0.0) == pytest.approx(1.0)
    assert warmup_steps_for(100, 0.0) == 0
    assert warmup_steps_for(10, 0.01) == 1  # a positive ratio always warms up at least one step
    assert warmup_steps_for(200, 0.05) == 10


def test_lambda_lr_applies_the_schedule_to_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, 10, 2, 0.0))
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == [0.5, 1.0, 1.0]
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)


def test_ds_config_batch_arithmetic_and_precision():
    cfg = ds_config(zero_stage=3, dtype="bf16", micro_batch=4, grad_accum=2, world_size=2, grad_clip=1.0)
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    cpu = ds_config(zero_stage=2, dtype="fp32", micro_batch=8, grad_accum=1, world_size=1, grad_clip=0.0)
    assert cpu["bf16"]["enabled"] is False and cpu["gradient_clipping"] == 0.0
    assert "stage3_gather_16bit_weights_on_model_save" not in cpu["zero_optimization"]


def test_grad_accum_steps_requires_divisibility():
    assert grad_accum_steps(32, 8, 2) == 2
    assert grad_accum_steps(32, 16, 1) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum_steps(30, 8, 2)


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    groups = param_groups(model, weight_decay=0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(model[0].weight)}
    assert len(groups[1]["params"]) == 3  # linear bias, norm weight, norm bias


def test_ds_config_offload_keys():
    """docs/design.md "Memory (issue 17)": offload to the CPU, pinned buffers only when asked (CUDA)."""
    plain = ds_config(3, "fp32", 2, 1, 1, 1.0)
    assert "offload_param" not in plain["zero_optimization"]
    assert "offload_optimizer" not in plain["zero_optimization"]
    both = ds_config(3, "bf16", 2, 1, 1, 1.0, offload_params=True, offload_optimizer=True, pin_memory=True)
    zero = both["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert both["zero_force_ds_cpu_optimizer"] is False  # torch AdamW runs the offloaded step
    cpu = ds_config(2, "fp32", 2, 1, 1, 1.0, offload_optimizer=True)
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in cpu["zero_optimization"]


@pytest.mark.parametrize(
    ("stage", "flags", "message"),
    [
        (2, {"offload_params": True}, "parameter offload needs ZeRO stage 3"),
        (0, {"offload_optimizer": True}, "optimizer offload needs ZeRO stage 1, 2 or 3"),
    ],
)
def test_ds_config_refuses_offload_its_stage_would_ignore(stage, flags, message):
    with pytest.raises(ValueError, match=message):
        ds_config(stage, "fp32", 2, 1, 1, 1.0, **flags)


def test_ds_config_persists_every_parameter_only_when_asked_and_not_offloaded():
    base = ds_config(3, "fp32", 2, 1, 2, 1.0)["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in base  # DeepSpeed's default (1e5 elements)
    whole = ds_config(3, "fp32", 2, 1, 2, 1.0, persist_params=True)["zero_optimization"]
    assert whole["stage3_param_persistence_threshold"] == PERSIST_ALL_THRESHOLD
    offloaded = ds_config(3, "fp32", 2, 1, 2, 1.0, persist_params=True, offload_params=True)
    assert "stage3_param_persistence_threshold" not in offloaded["zero_optimization"]


def test_persists_whole_by_the_size_of_the_weight_files(tmp_path):
    assert not persists_whole(None) and not persists_whole(tmp_path / "absent")
    assert not persists_whole(tmp_path)  # no weights at all
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    assert persists_whole(tmp_path)
    (tmp_path / "model-2.safetensors").write_bytes(b"\0" * PERSIST_ALL_BELOW_BYTES)
    assert not persists_whole(tmp_path)
