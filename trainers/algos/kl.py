"""Per-token KL estimators against the frozen reference (SFT) model (docs/ppo_details.md items 11, 13, 25).

The log-probs are of the *sampled* tokens, so each estimator is a single-sample Monte-Carlo estimate of
``KL(pi || pi_ref)`` at that position (Schulman, "Approximating KL divergence", 2020). With
``d = logprobs - ref_logprobs``:

- ``k1 = d``: unbiased, can be negative per token. InstructGPT's penalty and the default.
- ``k2 = d^2 / 2``: biased, never negative, low variance.
- ``k3 = exp(-d) - 1 + d``: unbiased and never negative. Computed as ``expm1(-d) + d`` for precision
  near 0; it is not clamped, so it overflows to inf only if the policy gives a sampled token ~e^-88 times
  the reference's probability (it never samples such tokens in practice).

All three are exactly 0 when the policy equals the reference (item 25, step 0).
"""

from __future__ import annotations

import torch

from trainers.algos._common import AlgoConfigError, upcast, zero_padding
from trainers.algos.masked import masked_sum

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "k1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, T)`` per-token KL estimate of kind ``k1``/``k2``/``k3`` (see module docstring).

    Computed in at least float32. With ``mask`` given, padding entries are set to 0; without it they are
    whatever the inputs give there. Unknown ``kind`` raises :class:`AlgoConfigError` (a ``ValueError``).
    """
    if kind not in KL_KINDS:
        raise AlgoConfigError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ"
        )
    log_ratio = upcast(logprobs) - upcast(ref_logprobs)  # (B, T)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    else:
        kl = torch.expm1(-log_ratio) + log_ratio
    return kl if mask is None else zero_padding(kl, mask)


def mean_sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-dim: batch mean of the per-sequence summed KL, the quantity the adaptive controller tracks
    (item 13, Ziegler et al. 2019). Rows without real tokens count as sequences with KL 0.

    Across data-parallel shards: all-reduce the sum of per-sequence KLs and the number of sequences and
    divide; with the single-controller driver the whole batch is already in one place.
    """
    return masked_sum(upcast(kl), mask, dim=-1).mean()
