"""The iteration's schedule: derived seeds, which prompt and pretraining rows it takes, the PPO epochs'
permutations and their minibatches, and how each optimizer step is laid out over the ranks.

Every random choice of a run derives from the config seed and counters (:func:`derived_seed`), so a
checkpoint stores counters only. Pure: torch and ``trainers.data``, no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trainers import algos
from trainers.data.collate import IGNORE_INDEX, collate_lm
from trainers.data.packing import equal_packs, padded_size
from trainers.data.sharding import split_sizes
from trainers.ppo.batch import PtxBatch, TokenBatch

if TYPE_CHECKING:  # annotations only: the actors import this module, and must not import the config
    from trainers.config import PPOConfig

_SEED_MOD = 2**31 - 1


def derived_seed(seed: int, *parts: int) -> int:
    """A deterministic seed for (seed, parts...) -- e.g. (seed, iteration, engine) for sampling
    (docs/ppo_details.md item 6: each engine its own seed). Every random choice of a run is derived from the
    config seed and the iteration this way, so a resumed run needs no saved generator state."""
    value = seed % _SEED_MOD
    for part in parts:
        value = (value * 1_000_003 + part + 1) % _SEED_MOD
    return value


def pass_order(num_rows: int, seed: int, pass_index: int) -> torch.Tensor:
    """``(num_rows,)`` permutation of the ``pass_index``-th pass over a dataset (prompts or ptx text).
    Not the PPO epochs over one rollout batch (:func:`epoch_permutations`)."""
    g = torch.Generator().manual_seed(derived_seed(seed, pass_index))
    return torch.randperm(num_rows, generator=g)


def take_rows(position: int, count: int, num_rows: int, seed: int) -> list[int]:
    """Row indices ``position .. position + count - 1`` of the endless stream of shuffled passes over a
    dataset of ``num_rows`` rows: pass k is :func:`pass_order` ``(num_rows, seed, k)``. The caller keeps
    ``position`` (rows consumed so far); that single integer is the data position a checkpoint stores."""
    if num_rows < 1:
        raise ValueError("cannot take rows from an empty dataset")
    rows: list[int] = []
    pass_index, offset = divmod(position, num_rows)
    while len(rows) < count:
        order = pass_order(num_rows, seed, pass_index)
        rows.extend(order[offset : offset + count - len(rows)].tolist())
        pass_index, offset = pass_index + 1, 0
    return rows


def epoch_permutations(num_rows: int, epochs: int, seed: int, iteration: int) -> list[torch.Tensor]:
    """One fresh ``(num_rows,)`` permutation per PPO epoch of ``iteration`` (docs/ppo_details.md item 21)."""
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


def rank_micro_batches(
    steps: Sequence[torch.Tensor],
    world: int,
    micro_batch_size: int,
    micro_batch_tokens: int = 0,
    lengths: Sequence[tuple[int, int]] | None = None,
) -> list[list[list[torch.Tensor]]]:
    """``out[rank][step]`` = that rank's micro-batches (row indices) of each optimizer step.

    Every step's rows are split evenly over ``world`` ranks (rank r the r-th contiguous part), then into
    micro-batches of ``micro_batch_size``; config validation guarantees both divisions are exact, and then
    every rank runs the same number of micro-batches per step (ZeRO-3 lock-step).

    With ``micro_batch_tokens`` > 0, each rank's part is instead packed by that token budget over the
    rows' ``(prompt, response)`` ``lengths`` (:func:`trainers.data.packing.equal_packs`): grouped by
    length, as many micro-batches on every rank (the most any rank packed to), none empty; the count may
    differ from step to step.
    """
    if micro_batch_tokens > 0:
        if lengths is None:
            raise ValueError("micro-batches by a token budget need the rows' lengths")
        return _token_micro_batches(steps, world, micro_batch_tokens, lengths)
    plan: list[list[list[torch.Tensor]]] = [[] for _ in range(world)]
    for rows in steps:
        if rows.numel() % (world * micro_batch_size):
            raise ValueError(
                f"minibatch of {rows.numel()} rows does not split into {world} ranks x micro-batches of {micro_batch_size}"
            )
        for rank, part in enumerate(rows.chunk(world)):
            plan[rank].append(list(part.split(micro_batch_size)))
    return plan


def _token_micro_batches(
    steps: Sequence[torch.Tensor], world: int, budget: int, lengths: Sequence[tuple[int, int]]
) -> list[list[list[torch.Tensor]]]:
    plan: list[list[list[torch.Tensor]]] = [[] for _ in range(world)]
    for rows in steps:
        if rows.numel() % world:
            raise ValueError(f"minibatch of {rows.numel()} rows does not split over {world} ranks")
        parts = rows.chunk(world)
        packs = equal_packs([[lengths[i] for i in part.tolist()] for part in parts], budget)
        for rank, (part, groups) in enumerate(zip(parts, packs)):
            plan[rank].append([part[torch.tensor(g, dtype=torch.long)] for g in groups])
    return plan


def padding_metrics(ranks: Sequence[RankPlan], tokens: TokenBatch, trimmed: bool) -> dict[str, float]:
    """``padding_fraction`` (padding / computed token slots) and ``micro_batches`` (per rank per step,
    mean) of one role's plan (the driver logs the policy's as ``policy/*``): a micro-batch computes rows x
    the batch's width ``P+R``, or -- ``trimmed`` (``ppo.micro_batch_tokens``) -- rows x (its longest prompt
    + longest response) (``trainers.data.packing.padded_size``)."""
    lengths = tokens.row_lengths()
    width = tokens.sequences.shape[1]
    real = slots = count = 0
    for rank in ranks:
        for step in rank.steps:
            for idx in step.micro_batches:
                rows = [lengths[i] for i in idx.tolist()]
                real += sum(p + r for p, r in rows)
                slots += padded_size(rows) if trimmed else len(rows) * width
                count += 1
    steps = sum(len(rank.steps) for rank in ranks)
    return {"padding_fraction": 1.0 - real / slots if slots else 0.0, "micro_batches": count / max(steps, 1)}


def step_token_counts(response_mask: torch.Tensor, steps: Sequence[torch.Tensor]) -> list[int]:
    """Real response tokens of each optimizer step over all ranks: the denominator of the token-mean
    losses (docs/ppo_details.md item 24), so every rank divides its sums by the same global count."""
    return [int(response_mask.index_select(0, rows).sum()) for rows in steps]


def lm_label_count(labels: torch.Tensor) -> int:
    """Predicted tokens of an LM batch (``labels (b, T)`` aligned with the input ids, ``IGNORE_INDEX`` =
    ignored): the loss shifts by one, so column 0 is never a target."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class PtxStep:
    """The pretraining text of one optimizer step, laid out for the policy ranks (docs/ppo_details.md item
    20)."""

    slots: list[list[PtxBatch | None]]
    """``slots[rank][micro]``: the pretraining micro-batch that rank adds to that micro-batch's loss, None
    for an empty slot; every rank has the same number of slots (ZeRO-3 lock-step)."""
    tokens: int
    """Predicted tokens of the step over all ranks: the denominator of the ptx token mean."""


def ptx_plan(rows: Sequence[Sequence[int]], world: int, micro_steps: int, pad_id: int) -> PtxStep:
    """Lay out one optimizer step's pretraining rows (``world x ptx_batch_size`` token lists): rank r
    takes the r-th equal part and spreads it over its ``micro_steps`` micro-batches (sizes differ by at
    most one, larger first; an empty slot is None)."""
    if len(rows) % world:
        raise ValueError(f"{len(rows)} ptx rows do not split over {world} ranks")
    per_rank = len(rows) // world
    plan: list[list[PtxBatch | None]] = []
    tokens = 0
    for rank in range(world):
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        slots: list[PtxBatch | None] = []
        start = 0
        for size in split_sizes(per_rank, micro_steps):
            if size == 0:
                slots.append(None)
                continue
            batch = collate_lm([(list(ids), 0) for ids in mine[start : start + size]], pad_id)
            tokens += lm_label_count(batch["labels"])
            slots.append(PtxBatch(batch["input_ids"], batch["attention_mask"], batch["labels"]))
            start += size
        plan.append(slots)
    return PtxStep(plan, tokens)


@dataclass
class StepPlan:
    """One optimizer step as one rank runs it."""

    micro_batches: list[torch.Tensor]
    """Row indices into the :class:`trainers.ppo.batch.Experience` of each of this rank's micro-batches."""
    tokens: int
    """Real response tokens of the step over all ranks (the token mean's denominator, docs/ppo_details.md item
    24)."""
    ptx: list[PtxBatch | None] | None = None
    """This rank's pretraining micro-batches, one slot per micro-batch (policy with ptx on); else None."""
    ptx_tokens: int = 0
    """Predicted pretraining tokens of the step over all ranks (with ``ptx``)."""
    denominator: float = 0.0
    """The policy loss's global denominator under ``ppo.loss_agg`` (``trainers.algos.agg_denominator``
    over the step's rows: its tokens for ``token_mean``, its sequences for ``seq_mean_token_mean``,
    sequences x ``rollout.max_new_tokens`` for ``token_sum_norm``; docs/ppo_details.md item 24)."""


@dataclass
class RankPlan:
    """Every optimizer step of one iteration for one rank of the policy or the critic."""

    first_step: int
    """Run-wide number (1-based) of the iteration's first optimizer step; step k of ``steps`` is
    ``first_step + k`` (fault injection names steps this way, ``cluster/faults.py``)."""
    steps: list[StepPlan]


@dataclass
class TrainPlan:
    """The train phase of one iteration: its minibatches and each rank's share of them."""

    first_step: int
    """Run-wide number (1-based) of the iteration's first optimizer step."""
    minibatches: list[torch.Tensor]
    """Row indices of every optimizer step, PPO epochs in order (docs/ppo_details.md item 21)."""
    step_tokens: list[int]
    """Real response tokens of each step over all ranks."""
    policy: list[RankPlan]
    """One per policy rank."""
    critic: list[RankPlan]
    """One per critic rank; empty without a critic (``ppo.advantage`` other than ``gae``)."""
    ptx_tokens: list[int] | None
    """Predicted pretraining tokens of each step over all ranks; None when ptx is off."""
    denominators: list[float]
    """The policy loss's global denominator of each step (:attr:`StepPlan.denominator`)."""
    ptx_rows: int
    """Pretraining rows the iteration consumed (the ptx data position advances by this)."""


def rank_plans(
    steps: Sequence[torch.Tensor],
    world: int,
    micro_batch_size: int,
    step_tokens: Sequence[int],
    first_step: int,
    ptx: Sequence[PtxStep] | None = None,
    denominators: Sequence[float] | None = None,
    micros: list[list[list[torch.Tensor]]] | None = None,
) -> list[RankPlan]:
    """Each of ``world`` ranks' :class:`RankPlan` for the optimizer steps ``steps`` (and, for the policy
    with ptx on, one :class:`PtxStep` per step; ``denominators``: the policy loss's, default the token
    counts). ``micros``: the micro-batches (:func:`rank_micro_batches`) when already laid out, else those
    of ``micro_batch_size``."""
    if micros is None:
        micros = rank_micro_batches(steps, world, micro_batch_size)
    plans = []
    for rank in range(world):
        step_plans = [
            StepPlan(
                micro_batches=micros[rank][k],
                tokens=step_tokens[k],
                ptx=ptx[k].slots[rank] if ptx else None,
                ptx_tokens=ptx[k].tokens if ptx else 0,
                denominator=float(denominators[k] if denominators is not None else step_tokens[k]),
            )
            for k in range(len(steps))
        ]
        plans.append(RankPlan(first_step, step_plans))
    return plans


def plan_training(
    p: PPOConfig,
    iteration: int,
    response_mask: torch.Tensor,
    ptx_data: Sequence[Sequence[int]],
    ptx_position: int,
    pad_id: int,
    norm_length: int = 0,
    lengths: Sequence[tuple[int, int]] | None = None,
) -> TrainPlan:
    """The :class:`TrainPlan` of (0-based) ``iteration``: fresh permutations per PPO epoch cut into
    minibatches, their global token counts, each rank's micro-batches and -- with ``ppo.ptx_coef > 0`` --
    the pretraining rows of every step, taken from ``ptx_data`` at ``ptx_position`` on, one slot per
    policy micro-batch. ``norm_length``: ``rollout.max_new_tokens``, the constant of
    ``ppo.loss_agg=token_sum_norm``; ``lengths``: each row's ``(prompt, response)`` real tokens
    (``TokenBatch.row_lengths``), needed with ``ppo.micro_batch_tokens``."""
    perms = epoch_permutations(response_mask.shape[0], p.ppo_epochs, p.seed, iteration)
    steps = minibatches(perms, p.mini_batch_size)
    first_step = iteration * len(steps) + 1
    step_tokens = step_token_counts(response_mask, steps)
    denominators = [
        algos.agg_denominator(response_mask.index_select(0, rows), p.loss_agg, norm_length) for rows in steps
    ]
    layout = {"micro_batch_tokens": p.micro_batch_tokens, "lengths": lengths}
    policy = rank_micro_batches(steps, p.policy_workers, p.micro_batch_size, **layout)
    ptx: list[PtxStep] | None = None
    ptx_rows = 0
    if p.ptx_coef > 0:
        per_step = p.policy_workers * p.ptx_batch_size
        ptx = []
        for k in range(len(steps)):
            rows = take_rows(ptx_position + ptx_rows, per_step, len(ptx_data), derived_seed(p.seed, 1))
            ptx_rows += per_step
            micro_steps = len(policy[0][k])  # the same on every rank
            ptx.append(ptx_plan([ptx_data[i] for i in rows], p.policy_workers, micro_steps, pad_id))
    critic = []
    if p.advantage == "gae":
        micros = rank_micro_batches(steps, p.critic_workers, p.micro_batch_size, **layout)
        critic = rank_plans(
            steps, p.critic_workers, p.micro_batch_size, step_tokens, first_step, micros=micros
        )
    return TrainPlan(
        first_step=first_step,
        minibatches=steps,
        step_tokens=step_tokens,
        policy=rank_plans(
            steps,
            p.policy_workers,
            p.micro_batch_size,
            step_tokens,
            first_step,
            ptx,
            denominators,
            micros=policy,
        ),
        critic=critic,
        ptx_tokens=[s.tokens for s in ptx] if ptx is not None else None,
        denominators=denominators,
        ptx_rows=ptx_rows,
    )
