"""Phase 1, generate: prompts to the vLLM engines and back as a rollout batch, with DAPO's dynamic sampling
(docs/design.md, issue 15).

Without dynamic sampling an iteration takes ``ppo.prompts_per_iteration`` prompts from the shuffled stream
and samples ``ppo.samples_per_prompt`` responses each, one seed per engine and iteration
(docs/ppo_details.md item 6). With it, every round's groups are scored at once; a group whose used scores
are all equal carries no signal for a group estimator (every advantage is 0) and is dropped; further
prompts are sampled until the batch holds ``prompts_per_iteration`` groups with signal or
``ppo.dynamic_sampling_rounds`` extra rounds are spent, and dropped groups fill what is left, so every
batch has the same shape (the train plan's arithmetic stays valid). Prompts come from the same
one-integer stream and every extra round's seed derives from (seed, iteration, engine, round): a resumed
run samples exactly what an uninterrupted one did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
import torch

from trainers import algos
from trainers.config import Config
from trainers.data.sharding import contiguous_bounds
from trainers.ppo.batch import Rollout, build_rollout_batch
from trainers.ppo.checkpoint import DriverState
from trainers.ppo.recovery import with_engine_recovery
from trainers.ppo.roles import Roles
from trainers.ppo.schedule import derived_seed, take_rows
from trainers.ppo.setup import RunData


@dataclass
class Sampled:
    """One iteration's rollout and where its rows came from."""

    rollout: Rollout
    rows: list[int]
    """Index into the run's prompts of every rollout row (each prompt's samples consecutive)."""
    scores: dict[str, torch.Tensor] | None = None
    """Every source's ``(N,)`` scores when dynamic sampling already computed them, else None."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``sampling/*`` (dynamic sampling only)."""


def generate(
    roles: Roles, prompts: Sequence[list[int]], sampling: dict, seed_of: Callable[[int], int], what: str
) -> list[dict]:
    """``prompts`` split over the engines in contiguous parts, engine ``e`` sampling with ``seed_of(e)``;
    the samples prompt-major (a prompt's ``n`` samples consecutive, engine order = prompt order). A lost
    engine is restarted and the whole call repeated with the same seeds (:func:`with_engine_recovery`)."""
    engines = roles.engines()
    bounds = contiguous_bounds(len(prompts), len(engines))

    def call() -> list[dict]:
        refs = [
            engine.generate.remote(list(prompts[lo:hi]), sampling, seed_of(e))
            for e, (engine, (lo, hi)) in enumerate(zip(engines, bounds))
            if hi > lo
        ]
        return [s for part in ray.get(refs) for s in part]

    return with_engine_recovery(roles, what, call)


def rollout_sampling(cfg: Config, n: int) -> dict:
    """vLLM sampling settings of the rollout (``n`` samples per prompt)."""
    r = cfg.rollout
    return {
        "n": n,
        "max_new_tokens": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
    }


def to_rollout(prompts: Sequence[list[int]], samples: Sequence[dict], data: RunData) -> Rollout:
    """The rollout batch of ``samples`` (one per row; ``prompts`` per row): cut at the run's stop ids,
    vLLM log-probs and finish reasons kept (:func:`trainers.ppo.batch.build_rollout_batch`)."""
    return build_rollout_batch(
        list(prompts),
        [s["token_ids"] for s in samples],
        data.pad_id,
        data.stop_ids,
        [s["logprobs"] for s in samples],
        [s["finish_reason"] for s in samples],
    )


def sample_round(
    roles: Roles, cfg: Config, data: RunData, state: DriverState, count: int, round_index: int
) -> tuple[list[int], list[dict]]:
    """Take ``count`` prompts from the stream (advancing ``state.prompt_position``) and sample them; round 0
    uses the iteration's engine seeds, round k > 0 seeds derived from k as well. Returns the prompt
    index and the samples of every row."""
    p = cfg.ppo
    rows = take_rows(state.prompt_position, count, len(data.prompts), p.seed)
    state.prompt_position += count
    it = state.iteration

    def seed_of(e: int) -> int:
        return derived_seed(p.seed, it, e) if round_index == 0 else derived_seed(p.seed, it, e, round_index)

    what = f"generate of iteration {it + 1}" + (f", round {round_index + 1}" if round_index else "")
    samples = generate(
        roles, [data.prompts[i] for i in rows], rollout_sampling(cfg, p.samples_per_prompt), seed_of, what
    )
    return [i for i in rows for _ in range(p.samples_per_prompt)], samples


Scorer = Callable[[Rollout, list[int]], tuple[dict[str, torch.Tensor], torch.Tensor]]
"""``(rollout, prompt index per row) -> (every source's scores, the used score (N,))``."""


def sample_rollouts(roles: Roles, cfg: Config, data: RunData, state: DriverState, score: Scorer) -> Sampled:
    """Phase 1 (module docstring): the iteration's rollout; with ``ppo.dynamic_sampling`` the groups with
    signal first, scored already (``score``), else unscored."""
    p = cfg.ppo
    if not p.dynamic_sampling:
        rows, samples = sample_round(roles, cfg, data, state, p.prompts_per_iteration, 0)
        return Sampled(to_rollout([data.prompts[i] for i in rows], samples, data), rows)
    n, target = p.samples_per_prompt, p.prompts_per_iteration
    kept: list[tuple[list[int], list[dict], dict[str, torch.Tensor]]] = []
    dropped: list[tuple[list[int], list[dict], dict[str, torch.Tensor]]] = []
    count, seen, consumed = target, 0, 0
    for round_index in range(p.dynamic_sampling_rounds + 1):
        rows, samples = sample_round(roles, cfg, data, state, count, round_index)
        consumed += count
        scores, used = score(to_rollout([data.prompts[i] for i in rows], samples, data), rows)
        constant = algos.group_is_constant(used, n).tolist()  # (count,)
        for g, flat in enumerate(constant):
            part = slice(g * n, (g + 1) * n)
            group = (rows[part], samples[part], {k: v[part] for k, v in scores.items()})
            (dropped if flat else kept).append(group)
        seen += count
        if len(kept) >= target:
            break
        rate = (seen - len(dropped)) / seen
        need = target - len(kept)
        count = target if rate == 0 else min(target, math.ceil(need / rate))
    chosen = kept[:target] + dropped[: max(0, target - len(kept))]
    rows = [i for group in chosen for i in group[0]]
    samples = [s for group in chosen for s in group[1]]
    scores = {k: torch.cat([group[2][k] for group in chosen]) for k in chosen[0][2]}
    metrics = {
        "sampling/rounds": float(round_index + 1),
        "sampling/prompts": float(consumed),
        "sampling/dropped_groups": float(len(dropped)),
        "sampling/filled_groups": float(max(0, target - len(kept))),
    }
    return Sampled(to_rollout([data.prompts[i] for i in rows], samples, data), rows, scores, metrics)
