"""The DeepSpeed (ZeRO) wrapper of the stages and the PPO actors: config, AdamW, LR schedule, construction.

One path on every machine:

- CPU: gloo process group, fp32, torch ``AdamW`` (DeepSpeed's fused/CPU Adam need compiled ops;
  ``zero_allow_untested_optimizer`` lets ZeRO wrap a torch optimizer);
- GPU: nccl, bf16 (DeepSpeed keeps fp32 master weights), the same torch ``AdamW``.

ZeRO-3 partitions parameters at construction: build a transformers model while the
``HfDeepSpeedConfig`` returned by :func:`hf_deepspeed_context` is alive (transformers then builds it
inside ``deepspeed.zero.Init`` and initialises/loads weights rank by rank), then call
:func:`init_deepspeed`. Building inside ``deepspeed.zero.Init`` directly crashed in transformers'
weight init.

The learning rate follows linear warm-up then cosine decay to ``min_lr_ratio x lr``
(:func:`lr_lambda`), a ``LambdaLR`` handed to DeepSpeed, which steps it once per optimizer step and
saves it in its checkpoints. (The word "engine" is kept for vLLM engines; a DeepSpeed-wrapped model is
"the DeepSpeed model" here, although DeepSpeed's own class is ``DeepSpeedEngine``.)
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

ADAM_BETAS = (0.9, 0.95)
"""AdamW betas (GPT-3 / InstructGPT-era LM training; 0.95 reacts faster than 0.999 to loss spikes)."""
ADAM_EPS = 1e-8
PERSIST_ALL_BELOW_BYTES = 64 * 2**20
"""A model whose weight files are smaller than this keeps every parameter whole on every ZeRO-3 rank
(:func:`persists_whole`): partitioning it saves a few MB per rank and costs an all-gather over the network
for each partitioned parameter at every use (docs/design.md, "Iteration benchmark (issue 17)")."""
PERSIST_ALL_THRESHOLD = 2**62
"""``stage3_param_persistence_threshold`` (in elements) that no parameter reaches: all persist."""
CHECKPOINT_TAG = "engine"
"""DeepSpeed checkpoint tag (the folder under a checkpoint directory) of the stages and the PPO actors. The
value is DeepSpeed's word and stays so, or older checkpoints would not load."""


def grad_accum_steps(global_batch: int, micro_batch: int, workers: int) -> int:
    """Micro-batches per rank per optimizer step: ``global / (micro x workers)``, which must divide."""
    per_step = micro_batch * workers
    if global_batch % per_step:
        raise ValueError(f"global batch {global_batch} is not a multiple of micro x workers = {per_step}")
    return global_batch // per_step


def ds_config(
    zero_stage: int,
    dtype: str,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    *,
    offload_params: bool = False,
    offload_optimizer: bool = False,
    pin_memory: bool = False,
    persist_params: bool = False,
) -> dict:
    """The DeepSpeed config dict of one engine.

    ``train_batch_size = micro x accumulation x world``. Gradient clipping 0 means off. ZeRO-3
    gathers a full copy of the 16-bit weights on save only on request (we gather ourselves, see
    :func:`gathered_state_dict`), and never prints its own progress.

    Offload (docs/design.md, "Memory (issue 17)"): ``offload_params`` keeps ZeRO-3's parameter partitions
    in CPU memory, ``offload_optimizer`` the fp32 master weights and AdamW state (and runs the step there);
    ``pin_memory`` (page-locked buffers, faster copies) only makes sense with CUDA. DeepSpeed silently
    ignores parameter offload below stage 3 and optimizer offload at stage 0, so both are refused here
    (the config gives users the same rule as one line). The optimizer stays torch's ``AdamW`` on every
    machine: ``zero_force_ds_cpu_optimizer`` off lets ZeRO-Offload run it instead of DeepSpeed's compiled
    CPU Adam.
    """
    if offload_params and zero_stage != 3:
        raise ValueError(f"parameter offload needs ZeRO stage 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3, got 0")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": False}
        if persist_params and not offload_params:
            zero["stage3_param_persistence_threshold"] = PERSIST_ALL_THRESHOLD
    offload = {"device": "cpu", "pin_memory": bool(pin_memory)}
    if offload_params:
        zero["offload_param"] = dict(offload)
    if offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def persists_whole(model_dir: str | Path | None) -> bool:
    """Whether the model in ``model_dir`` is small enough (its ``*.safetensors`` files below
    :data:`PERSIST_ALL_BELOW_BYTES`) to keep every parameter whole on every ZeRO-3 rank; False without a
    directory (a preset built at random: the stages decide for themselves)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return False
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return 0 < size < PERSIST_ALL_BELOW_BYTES


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps: ``round(ratio x total)``, at least 1 when the ratio is positive."""
    if warmup_ratio <= 0:
        return 0
    return max(1, round(warmup_ratio * total_steps))


def lr_lambda(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``.

    Warm-up: ``(step + 1) / warmup`` so the very first step already moves (a zero LR would waste it).
    Decay: ``min + (1 - min) * 0.5 * (1 + cos(pi * progress))``, progress from 0 at the end of
    warm-up to 1 at the last step; beyond ``total_steps`` it stays at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (weights of linear/embedding layers), none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitioned params are flat; their full shape is kept in ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def hf_deepspeed_context(config: dict):
    """The object that makes transformers build/load models ZeRO-3-partitioned; keep it alive
    while building the model and for the engine's lifetime (transformers holds only a weak ref)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def init_deepspeed(
    model: torch.nn.Module,
    config: dict,
    *,
    lr: float,
    weight_decay: float = 0.0,
    total_steps: int,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 1.0,
):
    """Wrap ``model`` in a DeepSpeed engine with torch AdamW and the warm-up + cosine ``LambdaLR``.

    Returns the engine; ``engine.lr_scheduler`` is stepped by DeepSpeed at each optimizer step and
    saved in its checkpoints together with the optimizer state.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    warmup = warmup_steps_for(total_steps, warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, total_steps, warmup, min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def gathered(params, modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` are whole on every rank (collective; with
    ``modifier_rank`` that rank's changes are re-partitioned on exit); a no-op for parameters DeepSpeed
    does not partition."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def unwrap(model_or_engine) -> torch.nn.Module:
    """The transformers module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model_or_engine, "module", model_or_engine)
