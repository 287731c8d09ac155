"""DeepSpeed engines for the training stages and the PPO actors: config, optimizer, LR schedule, saving.

One path on every machine (ENV_NOTES):

- CPU: gloo process group, fp32, torch ``AdamW`` (DeepSpeed's fused/CPU Adam need compiled ops;
  ``zero_allow_untested_optimizer`` lets ZeRO wrap a torch optimizer);
- GPU: nccl, bf16 (DeepSpeed keeps fp32 master weights), the same torch ``AdamW``.

ZeRO-3 partitions parameters at construction: build a transformers model while the
``HfDeepSpeedConfig`` returned by :func:`hf_deepspeed_context` is alive (transformers then builds it
inside ``deepspeed.zero.Init`` and initialises/loads weights rank by rank), then call
:func:`init_engine`. Building inside ``deepspeed.zero.Init`` directly crashed in transformers'
weight init.

Inside Ray Train the torch process group already exists; :func:`init_distributed` makes DeepSpeed's
communication layer adopt it (without that DeepSpeed sees world size 1 and rejects the batch sizes).

Every training step (stages and PPO actors) goes through :class:`StepGuard`, which skips an optimizer
step whose loss (on any rank) or global gradient norm is not finite, on every rank alike.

The learning rate follows linear warm-up then cosine decay to ``min_lr_ratio x lr``
(:func:`lr_lambda`), a ``LambdaLR`` handed to DeepSpeed, which steps it once per optimizer step and
saves it in its checkpoints.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from trainers.files import replace_dir

ADAM_BETAS = (0.9, 0.95)
"""AdamW betas (GPT-3 / InstructGPT-era LM training; 0.95 reacts faster than 0.999 to loss spikes)."""
ADAM_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Device, dtype, distributed
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    """``'cuda'`` or ``'cpu'``: ``auto`` picks CUDA when present."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``'fp32'`` or ``'bf16'``: ``auto`` is fp32 on CPU (gloo has no bf16 fast path) and bf16 on GPU."""
    if dtype == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return dtype


def backend_for(device: str) -> str:
    """torch.distributed backend for a device: nccl on GPU, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def init_distributed(device: str) -> None:
    """Make DeepSpeed use the process group that Ray Train (or torchrun) already created.

    Safe to call more than once. Without an existing group, DeepSpeed creates one from the usual
    environment variables (MASTER_ADDR, RANK, WORLD_SIZE...).
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend_for(device))


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """torch.distributed barrier when a group exists, no-op otherwise."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64, one collective); the input itself without a group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (one all-reduce; collective); ``flag`` itself without a group."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def grads_finite(module: torch.nn.Module) -> bool:
    """Whether every gradient this rank holds in ``param.grad`` is finite (params without one count as
    finite). Only meaningful without ZeRO, where DeepSpeed leaves whole all-reduced gradients there."""
    return all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)


class StepGuard:
    """One optimizer step over several micro-batches, skipped if any rank's loss or the global gradient
    norm is not finite. Replaces ``engine.backward(loss); engine.step()`` per micro-batch::

        guard = StepGuard(engine)
        for i, batch in enumerate(batches):
            guard.backward_step(loss_of(batch), last=i == len(batches) - 1)
        guard.applied  # False: skipped -- weights, AdamW moments and LR schedule are untouched

    How a step is skipped, keeping DeepSpeed's micro-step/global-step counters and ZeRO buffers
    consistent: the non-finite-loss flag is all-reduced (MAX) before the last backward, so every rank
    decides alike (ZeRO-3 ranks step in lock-step). With ZeRO 1-3, DeepSpeed itself drops a step whose
    global gradient norm is NaN/inf (clears the gradients, skips AdamW and the LR scheduler, counts
    ``skipped_steps``) -- in fp32 too; a non-finite *loss* does not always give non-finite gradients
    (``loss + nan`` has finite ones), so for a flagged step the last backward is of ``loss * nan``,
    which sends it down that same path. Without ZeRO, DeepSpeed applies whatever gradients it has, so
    the (already all-reduced) gradients are checked here, and a bad step is dropped by
    :func:`skip_unpartitioned_step` instead of ``engine.step()``.
    """

    def __init__(self, engine, scale_wrt_gas: bool = True):
        self.engine = engine
        self.scale_wrt_gas = scale_wrt_gas
        self.bad_loss = False
        """A micro-batch loss of this step was non-finite on this rank."""
        self.applied: bool | None = None
        """After the last micro-batch: whether the optimizer step was applied."""

    def backward_step(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss, then DeepSpeed's step; ``last`` marks the accumulation
        boundary (collective there: every rank must call it with the same ``last``)."""
        engine = self.engine
        if last != engine.is_gradient_accumulation_boundary():
            raise RuntimeError("StepGuard: the caller's last micro-batch is not DeepSpeed's boundary")
        self.bad_loss |= not bool(torch.isfinite(loss.detach()).all())
        bad = any_rank(self.bad_loss) if last else False
        if bad:
            loss = loss * float("nan")  # non-finite gradients: DeepSpeed's own skip path (docstring)
        engine.backward(loss, scale_wrt_gas=self.scale_wrt_gas)
        if not last:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            return
        # Without ZeRO nothing checks the gradients (collective: every rank takes the same branch).
        if not engine.zero_optimization() and any_rank(bad or not grads_finite(engine.module)):
            skip_unpartitioned_step(engine)
            self.applied = False
            return
        engine.step()
        self.applied = not bad and engine.was_step_applied()


def skip_unpartitioned_step(engine) -> None:
    """Drop the accumulated gradients of a DeepSpeed engine without ZeRO and count the step as skipped,
    with the same bookkeeping as DeepSpeed's own overflow skip (no AdamW update, no LR-scheduler step;
    micro/global step counters advance). ``engine.step()`` cannot do it: with clipping on, it fails on
    parameters that have no gradient."""
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.skipped_steps += 1


# --------------------------------------------------------------------------------------------------
# DeepSpeed config and LR schedule (pure)
# --------------------------------------------------------------------------------------------------


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
) -> dict:
    """The DeepSpeed config dict of one engine.

    ``train_batch_size = micro x accumulation x world``. Gradient clipping 0 means off. ZeRO-3
    gathers a full copy of the 16-bit weights on save only on request (we gather ourselves, see
    :func:`gathered_state_dict`), and never prints its own progress.
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": False}
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


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


# --------------------------------------------------------------------------------------------------
# Engine construction
# --------------------------------------------------------------------------------------------------


def hf_deepspeed_context(config: dict):
    """The object that makes transformers build/load models ZeRO-3-partitioned; keep it alive
    while building the model and for the engine's lifetime (transformers holds only a weak ref)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def init_engine(
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


def unwrap(model_or_engine) -> torch.nn.Module:
    """The transformers module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model_or_engine, "module", model_or_engine)


# --------------------------------------------------------------------------------------------------
# Gathering and saving
# --------------------------------------------------------------------------------------------------


def gathered_state_dict(model_or_engine, to_rank: int | None = 0) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) parameters and persistent buffers, as CPU tensors.

    Collective under ZeRO-3: every rank must call it. Parameters are gathered one at a time
    (``deepspeed.zero.GatheredParameters``) so peak memory is one full parameter. Only ``to_rank``
    gets the tensors (None: every rank); other ranks get an empty dict.
    """
    import deepspeed

    module = unwrap(model_or_engine)
    keep = to_rank is None or rank() == to_rank
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if keep:
                out[name] = param.detach().to("cpu", copy=True)
    if keep:
        persistent = set(module.state_dict().keys())
        for name, buf in module.named_buffers():
            if name in persistent:
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def save_hf(
    model_or_engine,
    tokenizer,
    out_dir: str | Path,
    config_updates: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Save a (possibly ZeRO-3-partitioned) model as a plain Hugging Face directory, atomically.

    Collective: every rank calls it; rank 0 writes ``out_dir`` (safetensors ``save_pretrained`` +
    tokenizer + ``config_updates`` merged into config.json) into ``out_dir.tmp`` and renames it
    into place. ``dtype`` casts floating tensors before writing (default: as trained). Returns the
    path on rank 0, None elsewhere.
    """
    module = unwrap(model_or_engine)
    state = gathered_state_dict(module, to_rank=0)
    out_dir = Path(out_dir)
    for key, value in (config_updates or {}).items():
        setattr(module.config, key, value)  # on every rank: the live model must agree with the saved one
    result = None
    if rank() == 0:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        module.save_pretrained(str(tmp), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, out_dir)
        result = out_dir
    barrier()
    return result
