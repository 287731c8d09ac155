"""Reward-model ranking loss over K responses per prompt (docs/ppo_details.md item 8).

InstructGPT eq. 1 (Ouyang et al. 2022), after Stiennon et al. 2020: for a prompt x with ranked responses,

    loss(x) = -1 / #pairs * sum over pairs (w better than l) of log sigmoid(r(x, y_w) - r(x, y_l))

All K responses of a prompt are scored in one forward; every pair is then formed here from the
``(N, K)`` score matrix with ``(N, K, K)`` masks, without a Python loop over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.algos._common import upcast


def ranking_loss(scores: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, accuracy)`` for ``scores (N, K)`` and ``ranks (N, K)``.

    ``ranks``: integer, 0 = best, larger = worse, equal = tie, -1 = absent (a prompt with fewer than K
    responses). A pair (i, j) exists when both are present and ``ranks[i] < ranks[j]``; ties form none.

    - loss: per prompt the mean of ``-logsigmoid(s_better - s_worse)`` over its pairs (so every prompt
      weighs the same whatever its K), then the mean over prompts that have at least one pair. Prompts
      with no pair (all tied) are excluded; a batch with no pair at all gives loss 0 (still attached to
      the graph, zero gradient).
    - accuracy (detached 0-dim): share of all pairs in the batch whose better response scores strictly
      higher; 0 if there is no pair. Pair-weighted, to match what "RM accuracy" means on held-out data.

    Scores of absent entries are ignored and may hold anything.
    """
    if ranks.shape != scores.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and ranks {tuple(ranks.shape)} must both be (N, K)")
    if ranks.is_floating_point():
        raise ValueError("ranks must be an integer tensor (0 = best, -1 = absent)")
    present = ranks >= 0  # (N, K)
    raw = upcast(scores)  # (N, K)
    s = torch.where(present, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))  # absent -> 0
    both = present.unsqueeze(2) & present.unsqueeze(1)  # (N, K, K)
    better = both & (ranks.unsqueeze(2) < ranks.unsqueeze(1))  # (N, K, K): response i beats response j
    margin = s.unsqueeze(2) - s.unsqueeze(1)  # (N, K, K): s_i - s_j
    pair_loss = torch.where(better, -F.logsigmoid(margin), torch.zeros_like(margin))  # (N, K, K)
    pairs = better.sum(dim=(1, 2))  # (N,)
    per_prompt = pair_loss.sum(dim=(1, 2)) / pairs.clamp(min=1).to(margin.dtype)  # (N,)
    has_pair = pairs > 0
    loss = torch.where(has_pair, per_prompt, torch.zeros_like(per_prompt)).sum()
    loss = loss / has_pair.sum().clamp(min=1).to(loss.dtype)
    with torch.no_grad():
        correct = (better & (margin > 0)).sum()
        accuracy = correct.to(margin.dtype) / pairs.sum().clamp(min=1).to(margin.dtype)
    return loss, accuracy.detach()
