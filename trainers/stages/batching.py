"""Which examples each optimizer step of a stage takes (pure: no torch, no Ray).

Each epoch is a seeded permutation of the training examples (:func:`epoch_order`); optimizer step ``s``
of an epoch takes the ``G = global_batch_size`` examples at positions ``[s*G, (s+1)*G)`` of it
(:func:`step_indices`). How those are split over ranks and micro-batches is
:mod:`trainers.data.sharding`'s (rank ``r`` of ``W`` takes the contiguous ``G/W``, in micro-batches of
``micro_batch_size``), so the union over ranks is the same whatever ``W``. The order is a function of
seed and epoch only, so the step counter alone fixes where a resumed run continues.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def plan_steps(n_train: int, global_batch: int, epochs: int, max_steps: int) -> tuple[int, int, int]:
    """``(steps_per_epoch, schedule_steps, stop_step)``.

    Full global batches per epoch (the remainder is dropped, a different part each epoch); the LR
    schedule spans all ``epochs``; ``max_steps`` (when positive) stops the run early *without*
    changing the schedule, so a run stopped at N and continued with a larger ``max_steps`` is the
    same run as one never stopped.
    """
    steps_per_epoch = n_train // global_batch
    schedule = steps_per_epoch * epochs
    stop = min(schedule, max_steps) if max_steps > 0 else schedule
    return steps_per_epoch, schedule, stop


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of ``range(n)`` for ``epoch`` (same on every rank and every run)."""
    order = list(range(n))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


def step_indices(order: Sequence[int], index_in_epoch: int, global_batch: int) -> list[int]:
    """The global batch of optimizer step ``index_in_epoch`` of an epoch."""
    start = index_in_epoch * global_batch
    return list(order[start : start + global_batch])
