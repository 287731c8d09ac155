"""Per-token advantages: GAE with a critic, discounted returns without one (docs/ppo_details.md items 12,
15, 16, 31).

Schulman et al. 2016, "High-dimensional continuous control using generalized advantage estimation":

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}

Each response is one episode; the value after its last real token is 0 (the episode ends there, the RM
score is already in ``r`` at that token).

Without a critic, REINFORCE++ (Hu 2025) uses the discounted return ``G_t = r_t + gamma * G_{t+1}`` of the
shaped rewards as the advantage, whitened over the whole batch. That return is GAE with ``V = 0`` and
``lam = 1``, so both share the one backward loop below.
"""

from __future__ import annotations

import torch

from trainers.algos._common import bool_mask, upcast, zero_padding
from trainers.algos.masked import masked_whiten


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both ``(B, T)``, detached, 0 on padding.

    - Backwards over tokens; a token whose successor is padding (or the end of the row) is terminal, so
      its bootstrap value is 0 and no advantage leaks in from padding (items 12, 15). Real tokens are
      expected to be contiguous in a row (they are after cutting at the first EOS); a hole would act as
      an episode end.
    - ``returns = advantages + values`` with the *raw* advantages; whiten afterwards, never before
      (item 16), so the critic's target stays in reward units.
    - Defaults ``gamma=1`` (no discount within a response), ``lam=0.95`` as in InstructGPT-style PPO.
    - Computed in at least float32; a Python loop over T (a few thousand steps at most) vectorised over B.
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ")
    m = bool_mask(mask, rewards)
    r = zero_padding(upcast(rewards.detach()), m)  # (B, T)
    v = zero_padding(upcast(values.detach()), m).to(r.dtype)  # (B, T)
    m_f = m.to(r.dtype)
    advantages = torch.zeros_like(r)  # (B, T)
    next_adv = torch.zeros_like(r[:, 0])  # (B,)
    next_value = torch.zeros_like(r[:, 0])  # (B,)
    next_real = torch.zeros_like(r[:, 0])  # (B,) 1 where token t+1 is real
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]  # next_value is 0 past the end
        next_adv = delta + gamma * lam * next_real * next_adv
        advantages[:, t] = next_adv
        next_value, next_real = v[:, t], m_f[:, t]
    advantages = advantages * m_f
    returns = (advantages + v) * m_f
    return advantages, returns


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``(B, T)`` detached ``G_t = r_t + gamma * G_{t+1}`` over real tokens, 0 on padding.

    A token whose successor is padding is terminal (``G_t = r_t``), exactly as in :func:`gae`, of which
    this is the ``values = 0, lam = 1`` case.
    """
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return advantages


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both ``(B, T)``, for REINFORCE++ (Hu 2025; item 31).

    ``returns`` = :func:`discounted_returns` of the shaped rewards (KL penalty per token, score at the
    last one); ``advantages`` = those returns whitened over every real token of the batch (item 17), which
    plays the baseline's part without a critic. Returns are kept for logging; nothing regresses on them.
    """
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask), returns
