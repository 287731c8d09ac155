"""From the experience passes (old and reference log-probs, scores, values) to what PPO trains on: per-token
KL, shaped rewards, advantages and -- with a critic -- returns (docs/ppo_details.md item 11-17, 29, 31).

``ppo.advantage`` picks the estimator (:data:`ESTIMATORS`); all of them start from the same used score
(summed sources -> clip -> missing-stop penalty -> overlong shaping) and the same per-token KL penalty, so
switching estimators changes only how credit is assigned (docs/design.md, issue 15).

Pure: ``trainers.algos`` on whole-batch tensors, no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainers import algos
from trainers.ppo.batch import Experience, TokenBatch

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""``ppo.advantage``; every one but ``gae`` is critic-free."""


@dataclass
class ExperiencePasses:
    """The no-grad passes over one rollout, whole batch (the shards' padding rows dropped)."""

    old_logprobs: torch.Tensor
    """``(N, R)`` the policy's trained model (DeepSpeed), 0 on padding (docs/ppo_details.md item 5)."""
    ref_logprobs: torch.Tensor
    """``(N, R)`` the frozen SFT model, 0 on padding."""
    scores: torch.Tensor
    """``(N,)`` the weighted sum of the reward sources (``reward.weights``); the RM's is its raw score at the
    last real token, ``reward_bias`` added (docs/ppo_details.md item 7, 9)."""
    values: torch.Tensor | None = None
    """``(N, R)`` the critic's values, 0 on padding; None without a critic."""
    source_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    """``(N,)`` per source (``rm``, ``function``, ``url``) before weighting: the ``reward/<name>`` metrics."""


@dataclass
class ScoreShaping:
    """What happens to the summed score before the KL penalty joins it (``reward.*``)."""

    score_clip: float = 0.0
    """Clip to +-this (0: off; docs/ppo_details.md item 14)."""
    missing_eos_penalty: float = 0.0
    """Subtracted where the response was truncated (item 29)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment over the last N tokens before ``max_new_tokens`` (0: off)."""
    overlong_penalty: float = 1.0
    """The punishment at ``max_new_tokens``."""
    max_new_tokens: int = 0
    """``rollout.max_new_tokens``."""


@dataclass
class Advantages:
    """The experience maths of one batch: all ``(N, R)`` and 0 on padding, except ``scores (N,)``."""

    kl: torch.Tensor
    """Per-token KL estimate between policy and reference (docs/ppo_details.md item 11)."""
    scores: torch.Tensor
    """``(N,)`` the scores used in the reward: clipped if ``reward.score_clip`` (docs/ppo_details.md item
    14), then lowered by ``reward.missing_eos_penalty`` on truncated responses (item 29)."""
    penalised: torch.Tensor
    """``(N,)`` bool: the responses whose score got the missing-stop penalty."""
    rewards: torch.Tensor
    """``-beta kl`` on every response token, plus the score on the last real one."""
    advantages: torch.Tensor
    """The estimator's per-token advantages: GAE's whitened over every real token of the batch
    (docs/ppo_details.md item 15, 17), a group estimator's sequence advantage on each token (item 31)."""
    values: torch.Tensor | None = None
    """The critic's values, zeroed on padding (docs/ppo_details.md item 12); None without a critic."""
    returns: torch.Tensor | None = None
    """GAE advantages before whitening + values: the critic's targets (item 16); None without a critic."""


def penalize_truncated(
    scores: torch.Tensor, truncated: torch.Tensor | None, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores - penalty on the truncated rows, which rows were penalised)``, both ``(N,)``
    (docs/ppo_details.md item 29): a response that hit the length limit without a stop id is half an
    answer the RM would rate as whole. ``penalty`` 0 or no ``truncated`` flags: scores unchanged."""
    if truncated is None or penalty <= 0:
        return scores, torch.zeros(scores.shape, dtype=torch.bool)
    hit = truncated.to(torch.bool)  # (N,)
    return scores - penalty * hit.to(scores.dtype), hit


def used_scores(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    shaping: ScoreShaping,
    truncated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the score each response is rewarded with, which rows got the missing-stop penalty)``, ``(N,)``:
    clipped if ``score_clip`` > 0, then minus ``missing_eos_penalty`` where ``truncated`` (after the clip,
    so a clip never cancels the penalty), then DAPO's overlong shaping on the response length."""
    clip = shaping.score_clip
    clipped = algos.normalize_scores(scores, clip=clip if clip > 0 else None)  # (N,)
    used, penalised = penalize_truncated(clipped, truncated, shaping.missing_eos_penalty)  # (N,) each
    if shaping.overlong_buffer > 0:
        lengths = response_mask.sum(-1)  # (N,)
        used = used + algos.overlong_penalty(
            lengths, shaping.max_new_tokens, shaping.overlong_buffer, shaping.overlong_penalty
        )
    return used, penalised


def estimate(
    estimator: str,
    used: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    kl_coef: float,
    gamma: float,
    lam: float,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(rewards, advantages, returns)`` of ``estimator`` (docs/ppo_details.md item 12-17, 31); ``used``
    ``(N,)`` scores, ``kl`` ``(N, R)``; rows prompt-major in groups of ``group_size``.

    - ``gae``: KL-shaped token rewards -> GAE with the critic's ``values`` -> whitened advantages.
    - ``grpo``/``dr_grpo``/``rloo``: the group advantage of each sequence's total shaped reward (score
      minus the KL penalty, 0 when the KL lives in the loss instead) on every one of its tokens.
    - ``reinforce_pp``: discounted returns of the shaped token rewards, whitened over the batch.
    - ``reinforce_pp_baseline``: the same with the group-centred score in place of the score.
    """
    if estimator == "reinforce_pp_baseline":
        used = algos.group_advantages(used, group_size, "reinforce_pp_baseline")  # (N,)
    rewards = algos.shape_rewards(used, kl, mask, kl_coef)  # (N, R)
    if estimator == "gae":
        if values is None:
            raise ValueError("ppo.advantage=gae needs the critic's values")
        advantages, returns = algos.gae(rewards, values, mask, gamma, lam)  # (N, R) each
        return rewards, algos.masked_whiten(advantages, mask), returns
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages, returns = algos.reinforce_pp_advantages(rewards, mask, gamma)
        return rewards, advantages, returns
    if estimator in ("grpo", "dr_grpo", "rloo"):
        totals = algos.masked_sum(rewards, mask, dim=-1)  # (N,)
        per_sequence = algos.group_advantages(totals, group_size, estimator)  # (N,)
        return rewards, algos.broadcast_to_tokens(per_sequence, mask), None
    raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")


def compute_advantages(
    response_mask: torch.Tensor,
    passes: ExperiencePasses,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    score_clip: float = 0.0,
    truncated: torch.Tensor | None = None,
    missing_eos_penalty: float = 0.0,
    *,
    estimator: str = "gae",
    group_size: int = 1,
    shaping: ScoreShaping | None = None,
) -> Advantages:
    """Whole-batch experience maths (docs/ppo_details.md item 11-17, 29, 31), ``response_mask (N, R)``:

    ``kl`` (per token, 0 on padding) -> the used score (:func:`used_scores`; ``shaping`` when given,
    else ``score_clip`` and ``missing_eos_penalty``) -> ``estimator``'s rewards, advantages and returns
    (:func:`estimate`). The driver holds all ranks' rows, so every whitening is the global one of item 17.
    ``values`` come back zeroed on padding, as the value loss expects (None without a critic).
    """
    mask = response_mask
    if shaping is None:
        shaping = ScoreShaping(score_clip=score_clip, missing_eos_penalty=missing_eos_penalty)
    kl = algos.kl_estimate(passes.old_logprobs, passes.ref_logprobs, kl_estimator, mask)  # (N, R)
    used, penalised = used_scores(passes.scores, mask, shaping, truncated)  # (N,) each
    values = None
    if passes.values is not None:
        values = torch.where(mask.bool(), passes.values.float(), torch.zeros(()))  # (N, R)
    rewards, advantages, returns = estimate(
        estimator, used, kl, mask, values, kl_coef, gamma, lam, group_size
    )
    return Advantages(
        kl=kl,
        scores=used,
        penalised=penalised,
        rewards=rewards,
        advantages=advantages,
        values=values if estimator == "gae" else None,
        returns=returns if estimator == "gae" else None,
    )


def build_experience(
    tokens: TokenBatch, passes: ExperiencePasses, adv: Advantages, with_ref: bool = False
) -> Experience:
    """What the training actors get: the tokens, the rollout-time log-probs, the advantages, and -- with a
    critic -- the padding-zeroed values and the returns; the reference log-probs only when ``with_ref``
    (the KL loss term)."""
    return Experience(
        tokens=tokens,
        old_logprobs=passes.old_logprobs,
        advantages=adv.advantages,
        values=adv.values,
        returns=adv.returns,
        ref_logprobs=passes.ref_logprobs if with_ref else None,
    )
