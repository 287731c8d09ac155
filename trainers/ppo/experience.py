"""From the experience passes (old and reference log-probs, scores, values) to what PPO trains on: per-token
KL, shaped rewards, advantages and returns (docs/ppo_details.md item 11-17, 29). New advantage estimators plug in
here: they take :class:`ExperiencePasses` and the response mask and give :class:`Advantages`.

Pure: ``trainers.algos`` on whole-batch tensors, no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers import algos
from trainers.ppo.batch import Experience, TokenBatch


@dataclass
class ExperiencePasses:
    """The four no-grad passes over one rollout, whole batch (the shards' padding rows dropped)."""

    old_logprobs: torch.Tensor
    """``(N, R)`` the policy's trained model (DeepSpeed), 0 on padding (docs/ppo_details.md item 5)."""
    ref_logprobs: torch.Tensor
    """``(N, R)`` the frozen SFT model, 0 on padding."""
    scores: torch.Tensor
    """``(N,)`` raw RM scores at the last real token, ``reward_bias`` added (docs/ppo_details.md item 7,
    9)."""
    values: torch.Tensor
    """``(N, R)`` the critic's values, 0 on padding."""


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
    values: torch.Tensor
    """The critic's values, zeroed on padding (docs/ppo_details.md item 12)."""
    returns: torch.Tensor
    """GAE advantages before whitening + values (docs/ppo_details.md item 16)."""
    advantages: torch.Tensor
    """GAE advantages whitened over every real token of the batch (docs/ppo_details.md item 15, 17)."""


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
) -> Advantages:
    """Whole-batch experience maths (docs/ppo_details.md item 11-17, 29), ``response_mask (N, R)``:

    ``kl`` (per token, 0 on padding) -> ``rewards`` = -beta kl + the used score on the last real token:
    the RM score, clipped if ``score_clip`` > 0, then minus ``missing_eos_penalty`` where ``truncated``
    ``(N,)`` is set (after the clip, so a clip never cancels the penalty) -> GAE ``advantages``/``returns``
    (returns from the raw advantages) -> advantages whitened over every real token of the batch (the
    driver holds all ranks' rows, so this is the global whitening of item 17). ``values`` come back
    zeroed on padding, as the value loss expects.
    """
    mask = response_mask
    kl = algos.kl_estimate(passes.old_logprobs, passes.ref_logprobs, kl_estimator, mask)  # (N, R)
    clipped = algos.normalize_scores(passes.scores, clip=score_clip if score_clip > 0 else None)  # (N,)
    used_scores, penalised = penalize_truncated(clipped, truncated, missing_eos_penalty)  # (N,) each
    rewards = algos.shape_rewards(used_scores, kl, mask, kl_coef)  # (N, R)
    advantages, returns = algos.gae(rewards, passes.values, mask, gamma, lam)  # (N, R) each
    return Advantages(
        kl=kl,
        scores=used_scores,
        penalised=penalised,
        rewards=rewards,
        values=torch.where(mask.bool(), passes.values.float(), torch.zeros(())),
        returns=returns,
        advantages=algos.masked_whiten(advantages, mask),
    )


def build_experience(tokens: TokenBatch, passes: ExperiencePasses, adv: Advantages) -> Experience:
    """What the training actors get: the tokens, the rollout-time log-probs, whitened advantages, the
    padding-zeroed values and the returns."""
    return Experience(
        tokens=tokens,
        old_logprobs=passes.old_logprobs,
        advantages=adv.advantages,
        values=adv.values,
        returns=adv.returns,
    )
