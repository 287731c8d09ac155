"""Micro-batches by a token budget: rows grouped by length so that padding drops, with the same number of
micro-batches on every rank (docs/design.md, "Token-budget micro-batches (issue 17)"). Pure: no torch.

A row is described by its *segment lengths*: a PPO row is ``(prompt, response)`` (prompt left-padded,
response right-padded, so a micro-batch cut to its real columns is as wide as its longest prompt plus its
longest response), a plain LM row is ``(length,)``. A micro-batch's *padded size* is its rows x that width:
the tokens its forward pass computes, real or padding.

- :func:`pack` sorts one rank's rows by total length and fills micro-batches greedily while the padded
  size stays within the budget; a row longer than the budget alone forms its own micro-batch.
- :func:`split_to` splits the most padded micro-batch (of two rows or more) in halves until there are
  as many as asked: ZeRO-3 gathers parameters in every forward (a collective), so every rank of a group
  must run the same number of forward passes, and :func:`equal_packs` brings every rank to the largest
  count any rank packed to.
"""

from __future__ import annotations

from collections.abc import Sequence

Lengths = Sequence[int]
"""One row's segment lengths, e.g. ``(prompt, response)``."""


def padded_size(lengths: Sequence[Lengths]) -> int:
    """Rows x (sum over segments of the longest): the tokens a micro-batch of these rows computes once its
    all-padding columns are cut; 0 for no rows."""
    if not lengths:
        return 0
    return len(lengths) * sum(max(segment) for segment in zip(*lengths))


def pack(lengths: Sequence[Lengths], budget: int) -> list[list[int]]:
    """Indices into ``lengths``, one list per micro-batch: rows by total length (ties by index), each
    micro-batch filled while its :func:`padded_size` stays within ``budget``; a row over the budget on its
    own forms one. Every index appears once; no micro-batch is empty."""
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (sum(lengths[i]), i))
    groups: list[list[int]] = []
    current: list[int] = []
    widths: tuple[int, ...] = ()
    for i in order:
        row = tuple(lengths[i])
        grown = tuple(max(a, b) for a, b in zip(widths, row)) if current else row
        if current and (len(current) + 1) * sum(grown) > budget:
            groups.append(current)
            current, grown = [], row
        current.append(i)
        widths = grown
    if current:
        groups.append(current)
    return groups


def split_to(groups: Sequence[Sequence[int]], count: int, lengths: Sequence[Lengths]) -> list[list[int]]:
    """``groups`` (indices into ``lengths``) split until there are ``count``: each time the one with the
    largest padded size among those of two rows or more (the earliest on a tie) becomes its two halves, in
    order (the first takes the odd row). Needs ``len(groups) <= count <= rows``."""
    out = [list(g) for g in groups]
    rows = sum(len(g) for g in out)
    if not len(out) <= count <= rows:
        raise ValueError(f"cannot split {len(out)} micro-batches of {rows} rows into {count}")
    while len(out) < count:
        splittable = [j for j in range(len(out)) if len(out[j]) > 1]
        k = max(splittable, key=lambda j: (padded_size([lengths[i] for i in out[j]]), -j))
        half = (len(out[k]) + 1) // 2
        out[k : k + 1] = [out[k][:half], out[k][half:]]
    return out


def equal_packs(per_rank: Sequence[Sequence[Lengths]], budget: int) -> list[list[list[int]]]:
    """``out[rank]``: that rank's micro-batches (indices into its own ``per_rank[rank]``), packed by
    :func:`pack`, then split (:func:`split_to`) so that every rank has as many as the rank that packed to
    the most. Every rank needs at least that many rows; equal row counts always have them."""
    packs = [pack(lengths, budget) for lengths in per_rank]
    count = max((len(p) for p in packs), default=0)
    return [split_to(p, count, lengths) for p, lengths in zip(packs, per_rank)]
