"""Splitting rows over ranks and micro-batches: the one place the PPO driver, the stages and the actors use.

Two kinds of split, because the two kinds of consumer need different things:

- **Equal shards** (:func:`equal_shards`, :func:`unshard`): ranks of one ZeRO-3 world forward in
  lock-step (parameters are gathered layer by layer, a collective), so every rank must get the same number
  of rows, and hence of micro-batches. Short shards are padded by repeating the last row; the padding's
  results are dropped on the way back.
- **Contiguous parts** (:func:`split_sizes`, :func:`contiguous_bounds`, :func:`rank_share`): independent
  workers (vLLM engines) or an exactly divisible global batch (a stage's optimizer step) need no padding.

:func:`micro_batches` cuts a rank's rows into consecutive micro-batches; :func:`eval_batches` gives each
rank the same number of evaluation batches (ZeRO-3 again), marking the repeats that pad the list.
Pure Python and torch: no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One rank's rows of an equal split: ``indices (size,)`` into the batch; the first ``num_real`` are
    the rank's own rows, the rest repeat the batch's last row (padding whose results are dropped)."""

    indices: torch.Tensor
    num_real: int


def equal_shards(num_rows: int, world: int) -> list[Shard]:
    """Rows ``0..num_rows-1`` in ``world`` contiguous shards of *equal* size (the last ones padded)."""
    if world < 1:
        raise ValueError(f"need at least one rank, got {world}")
    size = max(1, math.ceil(num_rows / world))
    shards = []
    for rank in range(world):
        start = rank * size
        real = max(0, min(size, num_rows - start))
        idx = torch.arange(start, start + size).clamp(max=num_rows - 1)  # (size,)
        shards.append(Shard(idx, real))
    return shards


def unshard(parts: Sequence[torch.Tensor], shards: Sequence[Shard]) -> torch.Tensor:
    """Concatenate per-rank results ``(size, ...)`` in rank order, keeping only each shard's real rows."""
    return torch.cat([part[: shard.num_real] for part, shard in zip(parts, shards, strict=True)], dim=0)


def split_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total`` that differ by at most one, larger first (zeros allowed)."""
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def contiguous_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``parts`` contiguous pieces of ``total`` items (sizes from :func:`split_sizes`)."""
    bounds, start = [], 0
    for size in split_sizes(total, parts):
        bounds.append((start, start + size))
        start += size
    return bounds


def rank_share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous share of ``items``, whose length ``world`` divides exactly."""
    if len(items) % world:
        raise ValueError(f"{len(items)} items do not split evenly over {world} ranks")
    share = len(items) // world
    return list(items[rank * share : (rank + 1) * share])


def micro_batches(items: Any, size: int) -> list[Any]:
    """Consecutive pieces of at most ``size`` rows of ``items``: a list, a tensor (rows = dimension 0), or
    a mapping of such fields that share their row count (each piece is then a dict)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be positive, got {size}")
    if isinstance(items, Mapping):
        lengths = {len(v) for v in items.values()}
        if len(lengths) != 1:
            raise ValueError(f"fields have different row counts: {sorted(lengths)}")
        n = lengths.pop()
        return [{k: v[s : s + size] for k, v in items.items()} for s in range(0, n, size)]
    return [items[s : s + size] for s in range(0, len(items), size)]


def eval_batches(num_rows: int, batch_size: int, rank: int, world: int) -> list[tuple[list[int], bool]]:
    """Rank ``rank``'s evaluation batches as ``(row indices, counted)``, round-robin over the ranks.

    The batch list is padded to a multiple of ``world`` with repeats of the first batch marked
    ``counted=False`` (their statistics are discarded), so every rank runs the same number of forwards.
    """
    batches = [list(range(i, min(i + batch_size, num_rows))) for i in range(0, num_rows, batch_size)]
    if not batches:
        return []
    padded = [(b, True) for b in batches]
    padded += [(batches[0], False)] * (-len(batches) % world)
    return padded[rank::world]
