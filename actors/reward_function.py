"""The reward function's CPU actors: ``reward.function_workers`` of them, each scoring a contiguous part.

    pool = FunctionRewardPool("trainers.data.gold:reward", workers=2, name_prefix="ppo")
    refs = pool.submit(prompts, responses, rows)   # in flight with the other experience calls
    scores = pool.collect(refs)                    # one ray.get; (n,) floats in row order
    pool.shutdown()

The function is loaded by its spec in every actor (``trainers.rewards.load_reward_function``); the driver
loads it once itself before anything starts, so a bad spec never reaches an actor. A failure while scoring
comes back from :meth:`FunctionRewardPool.collect` as the worker's own
:class:`~trainers.rewards.RewardSourceError` (source and absolute row), not Ray's wrapper. The actors hold
no state worth keeping: nothing of the pool is checkpointed (docs/design.md, "Estimators, reward sources,
evaluation while training (issue 15)").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import RayTaskError

from cluster.connect import runtime_env_vars
from trainers.data.sharding import contiguous_bounds
from trainers.rewards.function import (
    RewardSourceError,
    absolute_spec,
    call_reward_function,
    load_reward_function,
)

ROLE = "reward_function"
"""The role part of the actors' names, ``{name_prefix}-reward_function-{rank}``."""


def source_of(spec: str) -> str:
    """How errors name a function source: ``reward.function='<spec>'``."""
    return f"reward.function={spec!r}"


class RewardFunctionWorker:
    """One CPU actor running the user's reward function on its part of a batch."""

    def __init__(self, spec: str):
        self.source = source_of(spec)
        self.fn = load_reward_function(spec)

    def scores(self, prompts: list, responses: list[str], rows: list[dict], first_row: int) -> list[float]:
        """Checked scores of rows ``first_row``.. of the whole batch (RewardSourceError on a failure)."""
        return call_reward_function(self.fn, prompts, responses, rows, self.source, first_row)


def unwrap_reward_error(err: BaseException) -> RewardSourceError | None:
    """The :class:`RewardSourceError` an actor raised, from the ``RayTaskError`` that ``ray.get`` raises
    for it (its ``cause``), or ``err`` itself when it is one; None for any other error."""
    cause = err.cause if isinstance(err, RayTaskError) else err
    return cause if isinstance(cause, RewardSourceError) else None


class FunctionRewardPool:
    """``workers`` :class:`RewardFunctionWorker` actors over one spec; a batch is split into contiguous
    parts, one per worker."""

    def __init__(
        self,
        spec: str,
        workers: int,
        num_cpus: float = 0.25,
        name_prefix: str | None = None,
        options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ):
        """``spec`` as ``reward.function`` (a relative file path is made absolute here, where the driver
        runs; on a cluster the file must be at that path on every node). ``name_prefix`` names the actors
        ``{name_prefix}-reward_function-{rank}``; ``options`` go to every actor's ``.options(...)`` over the
        defaults here (e.g. a placement group scheduling strategy); a sequence gives each rank its own
        (the PPO driver pins rank r to its bundle)."""
        if workers < 1:
            raise ValueError(f"a reward function pool needs at least one worker, got {workers}")
        self.spec = absolute_spec(spec)
        remote_cls = ray.remote(RewardFunctionWorker)
        self.names = [f"{name_prefix}-{ROLE}-{rank}" if name_prefix else None for rank in range(workers)]
        per_rank = (
            [options or {}] * workers if options is None or isinstance(options, Mapping) else list(options)
        )
        self.actors = [
            remote_cls.options(
                **{
                    "num_cpus": num_cpus,
                    "runtime_env": {"env_vars": runtime_env_vars(1)},
                    "max_restarts": 0,
                    "max_task_retries": 0,
                    **({"name": name} if name else {}),
                    **per_rank[rank],
                }
            ).remote(self.spec)
            for rank, name in enumerate(self.names)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, prompts: list, responses: list[str], rows: list[dict]) -> list[ray.ObjectRef]:
        """Start scoring: one call per non-empty contiguous part (at most one per worker), in row order."""
        if not len(prompts) == len(responses) == len(rows):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(rows)} rows")
        return [
            actor.scores.remote(prompts[lo:hi], responses[lo:hi], rows[lo:hi], lo)
            for actor, (lo, hi) in zip(self.actors, contiguous_bounds(len(rows), len(self.actors)))
            if hi > lo
        ]

    def collect(self, refs: list[ray.ObjectRef]) -> list[float]:
        """The scores of :meth:`submit`'s calls, concatenated in row order (one ``ray.get``); a worker's
        RewardSourceError is raised as itself, any other error (a lost actor) as Ray raised it."""
        try:
            parts = ray.get(refs)
        except RayTaskError as err:
            cause = unwrap_reward_error(err)
            if cause is None:
                raise
            raise cause from None
        return [score for part in parts for score in part]

    def scores(self, prompts: list, responses: list[str], rows: list[dict]) -> list[float]:
        """:meth:`submit` then :meth:`collect`."""
        return self.collect(self.submit(prompts, responses, rows))

    def shutdown(self) -> None:
        """Stop every actor now, for good."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
