"""Critic-free advantages from a group of samples per prompt (docs/ppo_details.md item 31).

Rows are prompt-major: the ``group_size`` samples of one prompt are consecutive rows, so a ``(N,)``
score vector reshapes to ``(N // group_size, group_size)``, one row per prompt. Each sample's advantage
is its score minus a baseline built from its own group only:

- ``grpo`` (Shao et al. 2024, DeepSeekMath): ``(s - mean_g) / (std_g + 1e-6)``, unbiased std.
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training"): ``s - mean_g``; dividing by the
  std favours groups that are nearly all right or all wrong.
- ``rloo`` (Ahmadian et al. 2024, after Kool et al. 2019): ``s - mean of the other G - 1 samples``
  ``= (s - mean_g) * G / (G - 1)``; a sample is never part of its own baseline.
- ``reinforce_pp_baseline`` (Hu 2025, REINFORCE++): ``s - mean_g``; the whitening over the whole batch
  happens afterwards, on tokens.

A group whose scores are all equal gets exactly 0 for every kind: it carries no signal, and dynamic
sampling (DAPO, Yu et al. 2025) drops such groups (:func:`group_is_constant`).
"""

from __future__ import annotations

import torch

from trainers.algos._common import AlgoConfigError, bool_mask, upcast

GROUP_KINDS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")

#: Added to the group's standard deviation by ``grpo`` (TRL and verl use the same value).
GROUP_STD_EPS = 1e-6


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N // group_size, group_size)`` float32-or-wider detached view of ``scores (N,)``."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got shape {tuple(scores.shape)}")
    if group_size < 2 or scores.shape[0] % group_size:
        raise AlgoConfigError(
            f"group estimators need group_size >= 2 dividing the number of rows; got group_size "
            f"{group_size} for {scores.shape[0]} rows"
        )
    return upcast(scores.detach()).reshape(-1, group_size)


def group_is_constant(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N // group_size,)`` bool: True for groups whose scores are all exactly equal (max == min)."""
    s = _grouped(scores, group_size)  # (P, G)
    return s.amax(dim=1) == s.amin(dim=1)


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """``(N,)`` detached advantages of kind ``grpo``/``dr_grpo``/``rloo``/``reinforce_pp_baseline``
    (module docstring) for prompt-major ``scores (N,)``, in at least float32.

    ``group_size < 2``, a row count that is not a multiple of it, or an unknown ``kind`` raise
    :class:`AlgoConfigError`. A constant group is set to 0 explicitly, so rounding in its mean cannot
    leave a tiny non-zero advantage.
    """
    if kind not in GROUP_KINDS:
        raise AlgoConfigError(f"unknown group estimator {kind!r}; expected one of {', '.join(GROUP_KINDS)}")
    s = _grouped(scores, group_size)  # (P, G)
    centred = s - s.mean(dim=1, keepdim=True)  # (P, G)
    if kind == "grpo":
        centred = centred / (s.std(dim=1, correction=1, keepdim=True) + GROUP_STD_EPS)
    elif kind == "rloo":
        centred = centred * (group_size / (group_size - 1))
    constant = group_is_constant(scores, group_size).unsqueeze(1)  # (P, 1)
    return torch.where(constant, torch.zeros_like(centred), centred).reshape(-1)


def broadcast_to_tokens(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: each row's ``seq_values (B,)`` on its real tokens, 0 on padding.

    Spreads a sequence-level advantage over its response so every token of the response gets the same
    credit; an empty response gets nothing. Not detached (the group advantages already are).
    """
    if seq_values.dim() != 1 or mask.dim() != 2 or seq_values.shape[0] != mask.shape[0]:
        raise ValueError(
            f"seq_values {tuple(seq_values.shape)} must be (B,) for a (B, T) mask {tuple(mask.shape)}"
        )
    spread = upcast(seq_values).unsqueeze(1).expand(mask.shape)  # (B, T)
    return torch.where(
        bool_mask(mask, spread), spread, torch.zeros((), dtype=spread.dtype, device=spread.device)
    )
