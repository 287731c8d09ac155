"""The iteration's schedule: derived seeds, which prompt and pretraining rows it takes, the PPO epochs'
permutations and their minibatches, and how each optimizer step is laid out over the ranks.

Every random choice of a run derives from the config seed and counters (:func:`derived_seed`), so a
checkpoint stores counters only. Pure: torch and ``trainers.data``, no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainers.data.collate import collate_lm
from trainers.data.sharding import split_sizes

_SEED_MOD = 2**31 - 1


def derived_seed(seed: int, *parts: int) -> int:
    """A deterministic seed for (seed, parts...) -- e.g. (seed, iteration, engine) for sampling
    (PPO_DETAILS 6: each engine its own seed). Every random choice of a run is derived from the config
    seed and the iteration this way, so a resumed run needs no saved generator state."""
    value = seed % _SEED_MOD
    for part in parts:
        value = (value * 1_000_003 + part + 1) % _SEED_MOD
    return value


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """``(num_rows,)`` permutation used for pass ``epoch`` over a dataset (prompts or ptx text)."""
    g = torch.Generator().manual_seed(derived_seed(seed, epoch))
    return torch.randperm(num_rows, generator=g)


def take_rows(position: int, count: int, num_rows: int, seed: int) -> list[int]:
    """Row indices ``position .. position + count - 1`` of the endless stream of shuffled passes over a
    dataset of ``num_rows`` rows: pass e is :func:`epoch_order` ``(num_rows, seed, e)``. The caller keeps
    ``position`` (rows consumed so far); that single integer is the data position a checkpoint stores."""
    if num_rows < 1:
        raise ValueError("cannot take rows from an empty dataset")
    rows: list[int] = []
    epoch, offset = divmod(position, num_rows)
    while len(rows) < count:
        order = epoch_order(num_rows, seed, epoch)
        rows.extend(order[offset : offset + count - len(rows)].tolist())
        epoch, offset = epoch + 1, 0
    return rows


def epoch_permutations(num_rows: int, epochs: int, seed: int, iteration: int) -> list[torch.Tensor]:
    """One fresh ``(num_rows,)`` permutation per PPO epoch of ``iteration`` (PPO_DETAILS 21)."""
    out = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(derived_seed(seed, iteration, epoch, 7))
        out.append(torch.randperm(num_rows, generator=g))
    return out


def minibatches(perms: Sequence[torch.Tensor], mini_batch_size: int) -> list[torch.Tensor]:
    """Row indices of every optimizer step: each epoch's permutation cut into ``mini_batch_size`` rows."""
    steps = []
    for perm in perms:
        if perm.numel() % mini_batch_size:
            raise ValueError(f"{perm.numel()} rows do not split into minibatches of {mini_batch_size}")
        steps.extend(perm.split(mini_batch_size))
    return steps


def rank_plan(
    steps: Sequence[torch.Tensor], world: int, micro_batch_size: int
) -> list[list[list[torch.Tensor]]]:
    """``plan[rank][step]`` = that rank's micro-batches (row indices) of each optimizer step.

    Every step's rows are split evenly over ``world`` ranks, then into micro-batches of
    ``micro_batch_size``; config validation guarantees both divisions are exact, and then every rank runs
    the same number of micro-batches per step (ZeRO-3 lock-step).
    """
    plan: list[list[list[torch.Tensor]]] = [[] for _ in range(world)]
    for rows in steps:
        if rows.numel() % (world * micro_batch_size):
            raise ValueError(
                f"minibatch of {rows.numel()} rows does not split into {world} ranks x micro-batches of {micro_batch_size}"
            )
        for rank, part in enumerate(rows.chunk(world)):
            plan[rank].append(list(part.split(micro_batch_size)))
    return plan


def step_token_counts(response_mask: torch.Tensor, steps: Sequence[torch.Tensor]) -> list[int]:
    """Real response tokens of each optimizer step over all ranks: the denominator of the token-mean
    losses (PPO_DETAILS 24), so every rank divides its sums by the same global count."""
    return [int(response_mask.index_select(0, rows).sum()) for rows in steps]


def lm_label_count(batch: dict[str, torch.Tensor]) -> int:
    """Predicted tokens of an LM batch (``labels`` aligned with ``input_ids``, -100 = ignored): the loss
    shifts by one, so column 0 is never a target."""
    return int((batch["labels"][:, 1:] != -100).sum())


def ptx_plan(
    rows: Sequence[Sequence[int]], world: int, micro_steps: int, pad_id: int
) -> tuple[list[list[dict[str, torch.Tensor] | None]], int]:
    """The pretraining text of one optimizer step, laid out for the policy ranks (PPO_DETAILS 20).

    ``rows`` holds ``world x ptx_batch_size`` token lists; rank r takes the r-th equal part and spreads
    it over its ``micro_steps`` micro-batches (sizes differ by at most one; an empty slot is None, and
    every rank has the same slots, so ZeRO-3 ranks stay in lock-step). Returns ``(plan[rank][micro],
    global count of predicted tokens)`` -- the denominator of the ptx token mean.
    """
    if len(rows) % world:
        raise ValueError(f"{len(rows)} ptx rows do not split over {world} ranks")
    per_rank = len(rows) // world
    plan: list[list[dict[str, torch.Tensor] | None]] = []
    tokens = 0
    for rank in range(world):
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        slots: list[dict[str, torch.Tensor] | None] = []
        start = 0
        for size in split_sizes(per_rank, micro_steps):
            if size == 0:
                slots.append(None)
                continue
            batch = collate_lm([(list(ids), 0) for ids in mine[start : start + size]], pad_id)
            tokens += lm_label_count(batch)
            slots.append(batch)
            start += size
        plan.append(slots)
    return plan, tokens
