"""From the experience passes (old and reference log-probs, scores, values) to what PPO trains on: per-token
KL, shaped rewards, advantages and returns (PPO_DETAILS 11-17). New advantage estimators plug in here.

Pure: ``trainers.algos`` on whole-batch tensors, no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

import torch

from trainers import algos


def compute_advantages(
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    score_clip: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Whole-batch experience maths (PPO_DETAILS 11-17), all ``(N, R)`` except ``scores (N,)``:

    ``kl`` (per token, 0 on padding) -> ``rewards`` = -beta kl + (optionally clipped) score on the last
    real token -> GAE ``advantages``/``returns`` (returns from the raw advantages) -> advantages whitened
    over every real token of the batch (the driver holds all ranks' rows, so this is the global
    whitening of item 17). ``values`` come back zeroed on padding, as the value loss expects.
    """
    mask = response_mask
    kl = algos.kl_estimate(old_logprobs, ref_logprobs, kl_estimator, mask)  # (N, R)
    used_scores = algos.normalize_scores(scores, clip=score_clip if score_clip > 0 else None)  # (N,)
    rewards = algos.shape_rewards(used_scores, kl, mask, kl_coef)  # (N, R)
    advantages, returns = algos.gae(rewards, values, mask, gamma, lam)  # (N, R) each
    return {
        "kl": kl,
        "scores": used_scores,
        "rewards": rewards,
        "values": torch.where(mask.bool(), values.float(), torch.zeros(())),
        "returns": returns,
        "advantages": algos.masked_whiten(advantages, mask),
    }
