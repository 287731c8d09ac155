"""Masked reductions and whitening over real tokens (docs/ppo_details.md items 12, 17, 24).

``mask`` is 1 (or True) on real response tokens and 0 on padding; float, bool and integer masks are
accepted and any non-zero entry counts as real. Entries under padding are never read, so they may hold
anything, including inf or nan.

Variance convention: **biased** (population) variance, ``mean((x - mean)^2)`` over real tokens. Whitening
is a normalisation, not an estimate, and with the token counts of a PPO batch (thousands) the Bessel
factor ``n / (n - 1)`` is irrelevant; the biased form also needs no special case for a single token and
combines exactly across data-parallel ranks from (sum, sum of squares, count).
"""

from __future__ import annotations

import torch

from trainers.algos._common import bool_mask

#: Added to the variance before the reciprocal square root, so a constant batch whitens to 0, not nan.
WHITEN_EPS = 1e-8


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over real tokens; over everything (0-dim result) or along ``dim``."""
    m = bool_mask(mask, x)
    kept = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of real tokens (long tensor), over everything or along ``dim``."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over real tokens. An empty selection gives 0 (not nan), so an all-padding
    micro-batch contributes nothing instead of poisoning a sum of losses."""
    count = masked_count(bool_mask(mask, x), dim).to(x.dtype).clamp(min=1)
    return masked_sum(x, mask, dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Biased variance of ``x`` over real tokens (see the module docstring); 0 for an empty selection.

    Two-pass (mean first, then squared deviations) for accuracy on one device; the one-pass
    sum/sum-of-squares form lives in :func:`masked_moments` for combining ranks.
    """
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    return masked_mean((x - mean) ** 2, mask, dim)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(3,)`` float64 tensor ``[sum, sum of squares, count]`` of ``x`` over real tokens.

    Data parallelism (docs/ppo_details.md item 17, whiten over the whole batch): each rank computes its
    moments, the ranks ``all_reduce(SUM)`` this one tensor, and every rank then calls
    :func:`moments_to_mean_var` and :func:`whiten_with`. Summing is exact, so the result equals whitening the
    concatenated batch. float64 keeps ``E[x^2] - E[x]^2`` from cancelling.
    """
    x64 = x.detach().to(torch.float64)
    m = bool_mask(mask, x)
    total = masked_sum(x64, m)
    total_sq = masked_sum(x64 * x64, m)
    count = masked_count(m).to(torch.float64)
    return torch.stack([total, total_sq, count])  # (3,)


def moments_to_mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (0-dim float64) from ``[sum, sum of squares, count]``; (0, 0) if empty."""
    total, total_sq, count = moments.to(torch.float64).unbind()
    n = count.clamp(min=1)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp(min=0)  # rounding can leave a tiny negative
    return mean, var


def whiten_with(
    x: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor | float,
    var: torch.Tensor | float,
    shift_mean: bool = True,
    eps: float = WHITEN_EPS,
) -> torch.Tensor:
    """Whiten ``x`` with given statistics: ``(x - mean) / sqrt(var + eps)``; 0 on padding.

    With ``shift_mean=False`` the mean is added back, so the result keeps the original mean and only its
    spread is normalised (the lm-human-preferences convention, used e.g. for rewards).
    """
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var_t = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    out = (x - mean_t) * torch.rsqrt(var_t + eps)
    if not shift_mean:
        out = out + mean_t
    return torch.where(bool_mask(mask, x), out, torch.zeros((), dtype=out.dtype, device=out.device))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """Whiten ``x`` over all real tokens of this batch (item 17); 0 on padding.

    For data-parallel shards use :func:`masked_moments` + all-reduce + :func:`whiten_with` instead.
    """
    return whiten_with(x, mask, masked_mean(x, mask), masked_var(x, mask), shift_mean, eps)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` long: index of the last real token in each row of a ``(B, T)`` mask, -1 if the row has none.

    Uses the last position where the mask is set, not ``mask.sum() - 1``, so it is right for left-padded
    prompt+response rows too (docs/ppo_details.md item 7: the RM score is read at the last real token).
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)  # (B, T)
    return torch.where(m, positions, torch.full_like(positions, -1)).max(dim=-1).values
