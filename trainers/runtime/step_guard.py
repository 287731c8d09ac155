"""Optimizer steps that are skipped on every rank alike when a loss or the gradient norm is not finite.

Every training step of the stages and of the PPO actors goes through :class:`StepGuard`; the drivers
count what it skipped (:mod:`trainers.runtime.nonfinite`).
"""

from __future__ import annotations

import torch

from trainers.runtime.dist import any_rank


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
