"""Reward-model ranking loss (trainers/algos/ranking.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from trainers.algos import ranking_loss


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_three_ranked_responses_by_hand():
    # scores [2, 0, 1], ranks [0, 2, 1] -> order 0 > 2 > 1, pairs (better - worse):
    # (0, 1): 2 - 0 = 2;  (0, 2): 2 - 1 = 1;  (2, 1): 1 - 0 = 1
    # loss = mean of -log sigmoid(margin) = (softplus(-2) + 2 softplus(-1)) / 3 = 0.2511...; all correct.
    loss, acc = ranking_loss(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0, 2, 1]]))
    assert loss.item() == pytest.approx((softplus(-2) + 2 * softplus(-1)) / 3, rel=1e-6)
    assert acc.item() == 1.0


def test_ties_absent_entries_and_prompt_weighting_by_hand():
    # Row 0: ranks [0, 0, 1, -1]: responses 0 and 1 tie (no pair), 3 is absent (its nan score ignored).
    #        pairs (0, 2): 1 - 0 = 1; (1, 2): 3 - 0 = 3 -> (softplus(-1) + softplus(-3)) / 2, both correct.
    # Row 1: ranks [1, 0, -1, -1]: one pair (1, 0): 0.5 - 2 = -1.5 -> softplus(1.5), wrong order.
    # Row 2: ranks [0, 0, -1, -1]: all tied -> no pair, excluded from the prompt mean.
    # loss = mean over rows 0 and 1 (each prompt weighs the same); accuracy = 2 correct / 3 pairs.
    scores = torch.tensor([[1.0, 3.0, 0.0, float("nan")], [2.0, 0.5, 7.0, 1e30], [4.0, 5.0, 0.0, 0.0]])
    ranks = torch.tensor([[0, 0, 1, -1], [1, 0, -1, -1], [0, 0, -1, -1]])
    loss, acc = ranking_loss(scores, ranks)
    row0 = (softplus(-1) + softplus(-3)) / 2
    row1 = softplus(1.5)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert acc.item() == pytest.approx(2 / 3)


def test_equal_scores_are_not_correct():
    # margin 0: loss ln 2 and the pair is not counted as ordered correctly (strictly greater needed).
    loss, acc = ranking_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]]))
    assert loss.item() == pytest.approx(math.log(2))
    assert acc.item() == 0.0


def test_gradient_by_hand():
    # K = 2, s = [1, 0], first better: loss = softplus(-1); d/ds0 = -sigmoid(-1) = -0.268941, d/ds1 = +.
    scores = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss, _ = ranking_loss(scores, torch.tensor([[0, 1]]))
    loss.backward()
    s = 1 / (1 + math.e)
    torch.testing.assert_close(scores.grad, torch.tensor([[-s, s]]))


def test_no_pairs_gives_zero_loss_and_zero_grad():
    scores = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    loss, acc = ranking_loss(scores, torch.tensor([[0, 0], [1, -1]]))
    loss.backward()
    assert loss.item() == 0.0 and acc.item() == 0.0
    assert torch.equal(scores.grad, torch.zeros_like(scores))


def test_extreme_scores_are_finite():
    # margin -2e4 -> loss = softplus(2e4) = 2e4, gradient sigmoid(2e4) = 1 in magnitude.
    scores = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    loss, acc = ranking_loss(scores, torch.tensor([[1, 0], [1, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(1e4)  # (2e4 + 0) / 2 prompts
    assert acc.item() == 0.5
    assert torch.isfinite(scores.grad).all()
    torch.testing.assert_close(scores.grad[0], torch.tensor([0.5, -0.5]))


@pytest.mark.parametrize("seed", range(3))
def test_matches_pairwise_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 5, 6
    scores = torch.randn(n, k, generator=g) * 2
    ranks = torch.randint(0, 3, (n, k), generator=g)  # few distinct ranks -> many ties
    ranks[torch.rand(n, k, generator=g) < 0.25] = -1
    prompt_losses, correct, total = [], 0, 0
    for i in range(n):
        pair_losses = []
        for a, b in itertools.permutations(range(k), 2):
            if ranks[i, a] >= 0 and ranks[i, b] >= 0 and ranks[i, a] < ranks[i, b]:
                margin = scores[i, a] - scores[i, b]
                pair_losses.append(-F.logsigmoid(margin))
                correct += int(margin > 0)
                total += 1
        if pair_losses:
            prompt_losses.append(torch.stack(pair_losses).mean())
    loss, acc = ranking_loss(scores, ranks)
    torch.testing.assert_close(loss, torch.stack(prompt_losses).mean())
    assert acc.item() == pytest.approx(correct / total)


def test_rejects_float_ranks_and_shape_mismatch():
    with pytest.raises(ValueError, match="integer"):
        ranking_loss(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="must both be"):
        ranking_loss(torch.zeros(1, 2), torch.tensor([[0, 1, 2]]))
