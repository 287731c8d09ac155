"""Reward shaping: KL penalty on every token plus the RM score on the last one (docs/ppo_details.md item 11,
12, 14).

InstructGPT eq. 2 (Ouyang et al. 2022) maximises ``r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))``.
Spread over tokens (Ziegler et al. 2019, Stiennon et al. 2020): each response token gets
``-beta * kl_t``, and the sequence-level score ``r(x, y)`` is added at the last real token only.
"""

from __future__ import annotations

import torch

from trainers.algos._common import upcast, zero_padding
from trainers.algos.masked import last_token_index

#: Added to the standard deviation when whitening scores.
SCORE_EPS = 1e-8


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """``(B, T)`` shaped per-token rewards: ``-kl_coef * kl`` on real tokens, ``+ scores`` ``(B,)`` on the
    last real token of each row, 0 on padding (item 12).

    "Last real token" is the last index where ``mask`` is set, so it does not assume right padding. A row
    with no real token (an empty response) receives neither penalty nor score: there is no action to
    credit. Not detached: GAE detaches its inputs.
    """
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores shape {tuple(scores.shape)} must be (B,) with B={kl.shape[0]}")
    rewards = zero_padding(-kl_coef * upcast(kl), mask)  # (B, T)
    last = last_token_index(mask)  # (B,)
    has_token = last >= 0
    score = torch.where(has_token, upcast(scores).to(rewards.dtype), torch.zeros_like(rewards[:, 0]))  # (B,)
    bonus = torch.zeros_like(rewards).scatter(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))  # (B, T)
    return rewards + bonus


def normalize_scores(scores: torch.Tensor, whiten: bool = False, clip: float | None = None) -> torch.Tensor:
    """Optional score post-processing before shaping (item 14): whiten over the batch
    (``(s - mean) / (std + eps)``, biased std), then clamp to ``[-clip, clip]``. Both off = identity.

    Log the raw scores before calling this; the shaped rewards are logged separately.
    """
    out = upcast(scores)  # (B,)
    if whiten:
        out = (out - out.mean()) / (out.std(correction=0) + SCORE_EPS)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"score clip must be positive, got {clip}")
        out = out.clamp(-clip, clip)
    return out
