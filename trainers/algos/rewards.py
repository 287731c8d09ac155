"""Reward shaping: KL penalty on every token plus the RM score on the last one (docs/ppo_details.md item 11,
12, 14).

InstructGPT eq. 2 (Ouyang et al. 2022) maximises ``r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))``.
Spread over tokens (Ziegler et al. 2019, Stiennon et al. 2020): each response token gets
``-beta * kl_t``, and the sequence-level score ``r(x, y)`` is added at the last real token only.

Before shaping, the per-sequence score may be a weighted sum of several reward sources
(:func:`combine_scores`) and may carry DAPO's soft penalty for responses near the length limit
(:func:`overlong_penalty`; docs/ppo_details.md item 29 for the hard one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trainers.algos._common import AlgoConfigError, upcast, zero_padding
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


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """``(N,)`` float32 soft overlong punishment of DAPO (Yu et al. 2025), added to the scores.

    0 for ``length <= max_new_tokens - buffer``, then linear down to ``-penalty`` at ``max_new_tokens``:
    ``-(length - (max_new_tokens - buffer)) / buffer * penalty``; longer lengths stay at ``-penalty``.
    ``buffer=0`` turns it off (all zeros). A buffer outside ``[0, max_new_tokens]`` or a negative penalty
    raise :class:`AlgoConfigError`.
    """
    if not 0 <= buffer <= max_new_tokens:
        raise AlgoConfigError(
            f"overlong buffer must be in [0, max_new_tokens={max_new_tokens}], got {buffer}"
        )
    if penalty < 0:
        raise AlgoConfigError(f"overlong penalty must be >= 0, got {penalty}")
    n = upcast(lengths)  # (N,)
    if buffer == 0:
        return torch.zeros_like(n)
    excess = (n - (max_new_tokens - buffer)).clamp(0, buffer)  # (N,) tokens into the buffer
    return -excess / buffer * penalty


def combine_scores(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``(N,)`` weighted sum ``sum_name weights[name] * scores[name]`` in at least float32.

    ``scores`` maps a reward source's name to its ``(N,)`` scores; a source missing from ``weights``
    weighs 1. A weight for a name that is not among ``scores`` is a configuration mistake
    (:class:`AlgoConfigError` naming it); no scores at all, or scores of different shapes, raise
    ``ValueError``.
    """
    unknown = sorted(set(weights) - set(scores))
    if unknown:
        raise AlgoConfigError(
            f"reward weights name {', '.join(map(repr, unknown))}, which are not reward sources "
            f"({', '.join(map(repr, scores)) or 'none'})"
        )
    if not scores:
        raise ValueError("combine_scores needs at least one reward source")
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"every source's scores must be the same (N,) shape, got {shapes}")
    return sum(float(weights.get(name, 1.0)) * upcast(s) for name, s in scores.items())
