"""The no-grad passes over a rollout (:func:`score_rollout`) and the run's reward sources on the driver (docs/design.md, issue 15): the learned RM (an actor group, scored
with the other no-grad passes), a Python function (a pool of CPU actors) and an HTTP endpoint (a driver
thread), combined with ``reward.weights``.

The text sources see what a person would: each row's prompt record (``prompt`` value and extra columns)
and the decoded response without its stop token. Their calls start before the RM and log-prob passes are
collected, so a slow verifier overlaps with the GPU work instead of following it. A source that fails
(raises, wrong length, non-finite score, endpoint down after its retries) stops the run with one line
naming the source, the row and the checkpoint a rerun resumes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from trainers import algos
from trainers.config import Config
from trainers.data.sharding import Shard, equal_shards, unshard
from trainers.errors import RunStopped
from trainers.ppo.batch import TokenBatch
from trainers.ppo.checkpoint import newest_checkpoint
from trainers.ppo.experience import ScoreShaping
from trainers.ppo.roles import Roles
from trainers.rewards import RewardSourceError
from trainers.rewards.http import HttpReward
from trainers.runs.resume import resume_hint

PASSES = {
    "old_logprobs": ("policy", "logprobs"),
    "ref_logprobs": ("reference", "logprobs"),
    "rm": ("reward", "scores"),
    "values": ("critic", "values"),
}
"""The no-grad passes over a rollout: which role runs each and its method."""


def score_rollout(roles: Roles, tokens: TokenBatch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The passes ``names`` (:data:`PASSES`) over ``tokens``, all in flight together, one ``ray.get``;
    returned whole-batch (padding rows of the shards dropped).

    Each group gets ``tokens`` in equal shards, one per rank (ZeRO-3 lock-step); groups of the same size
    share the shards' ``ray.put``."""
    groups = {name: getattr(roles, PASSES[name][0]) for name in names}
    shards: dict[int, tuple[list[Shard], list[ray.ObjectRef]]] = {}
    refs = []
    for name, group in groups.items():
        if len(group) not in shards:
            split = equal_shards(len(tokens), len(group))
            shards[len(group)] = (split, [ray.put(tokens.rows(shard.indices)) for shard in split])
        method = PASSES[name][1]
        refs += [
            getattr(actor, method).remote(ref) for actor, ref in zip(group.actors, shards[len(group)][1])
        ]
    flat, out, pos = ray.get(refs), {}, 0
    for name, group in groups.items():
        out[name] = unshard(flat[pos : pos + len(group)], shards[len(group)][0])
        pos += len(group)
    return out


def response_texts(tokens: TokenBatch, stop_ids: Sequence[int], tokenizer) -> list[str]:
    """Each row's response as text: its real tokens, the final stop id dropped, decoded without special
    tokens (what a verifier or a remote judge should read)."""
    stops = set(stop_ids)
    lengths = tokens.response_mask.sum(-1).tolist()  # (N,)
    texts = []
    for ids, n in zip(tokens.responses().tolist(), lengths, strict=True):
        ids = ids[:n]
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


@dataclass
class PendingScores:
    """The text sources' calls in flight for one batch."""

    function: list[ray.ObjectRef] = field(default_factory=list)
    url: Future | None = None
    rows: list[dict] = field(default_factory=list)
    """The prompt record of every batch row (to name an offending row)."""


class RewardScorer:
    """Submits a batch to the text sources and combines every source's scores (``reward.weights``)."""

    def __init__(self, cfg: Config, roles: Roles, stop_ids: Sequence[int], tokenizer, checkpoints: Path):
        r = cfg.reward
        self.weights = dict(r.weights)
        self.shaping = ScoreShaping(
            score_clip=r.score_clip,
            missing_eos_penalty=r.missing_eos_penalty,
            overlong_buffer=r.overlong_buffer,
            overlong_penalty=r.overlong_penalty,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        """``reward.*`` settings that turn the summed score into the used one
        (:func:`trainers.ppo.experience.used_scores`)."""
        self.pool = roles.reward_function
        self.stop_ids, self.tokenizer, self.checkpoints = tuple(stop_ids), tokenizer, checkpoints
        self.http = HttpReward(r.url, r.url_timeout_s, r.url_retries) if r.url is not None else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="reward-url") if self.http else None

    def submit(self, tokens: TokenBatch, rows: Sequence[dict]) -> PendingScores:
        """Start the function and endpoint calls on ``tokens`` (``rows``: each row's prompt record)."""
        pending = PendingScores(rows=list(rows))
        if self.pool is None and self.http is None:
            return pending
        prompts = [row["prompt"] for row in rows]
        responses = response_texts(tokens, self.stop_ids, self.tokenizer)
        # The records leave this process serialised (actor calls, JSON): no source can change ours.
        if self.pool is not None:
            pending.function = self.pool.submit(prompts, responses, pending.rows)
        if self.http is not None:
            pending.url = self._thread.submit(self.http.scores, prompts, responses, pending.rows)
        return pending

    def collect(
        self, pending: PendingScores, rm_scores: torch.Tensor | None, iteration: int
    ) -> dict[str, torch.Tensor]:
        """Every source's ``(N,)`` scores by name (``rm``, ``function``, ``url``, in that order); a failed
        source raises :class:`RunStopped`."""
        out = {}
        if rm_scores is not None:
            out["rm"] = rm_scores.float()
        try:
            if self.pool is not None:
                out["function"] = torch.tensor(self.pool.collect(pending.function), dtype=torch.float32)
            if pending.url is not None:
                out["url"] = torch.tensor(pending.url.result(), dtype=torch.float32)
        except RewardSourceError as err:
            raise RunStopped(self._stop_message(err, pending.rows, iteration)) from err
        return out

    def combine(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N,)`` the weighted sum of the sources (unnamed sources weigh 1)."""
        return algos.combine_scores(scores, self.weights)

    def _stop_message(self, err: RewardSourceError, rows: Sequence[dict], iteration: int) -> str:
        where = ""
        if err.row is not None and 0 <= err.row < len(rows):
            prompt = rows[err.row]["prompt"]
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            where = f" (row {err.row}: prompt {text[:60]!r})"
        resume = resume_hint(newest_checkpoint(self.checkpoints))
        return f"ppo iteration {iteration}: {err}{where}; {resume}"

    def close(self) -> None:
        """Stop the endpoint thread (the pool's actors go with the other roles)."""
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
