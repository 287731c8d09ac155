"""GAE and REINFORCE++ returns (trainers/algos/advantages.py): hand values, a plain-loop reference,
padding, no grad."""

from __future__ import annotations

import random

import pytest
import torch

from trainers.algos import discounted_returns, gae, masked_whiten, reinforce_pp_advantages


def reference_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one row and one token at a time, over the first `length` tokens of each row."""
    batch, width = len(rewards), len(rewards[0])
    adv = [[0.0] * width for _ in range(batch)]
    ret = [[0.0] * width for _ in range(batch)]
    for b in range(batch):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + values[b][t]
    return adv, ret


def test_gae_by_hand_with_padding():
    # gamma = 1, lam = 0.5, r = [0, 0, 1], V = [0.5, 0.2, 0.4], then one padding token holding garbage.
    # t=2: delta = 1 + 0 - 0.4 = 0.6 (value after the last token is 0)   A2 = 0.6
    # t=1: delta = 0 + 0.4 - 0.2 = 0.2                                    A1 = 0.2 + 0.5 * 0.6 = 0.5
    # t=0: delta = 0 + 0.2 - 0.5 = -0.3                                   A0 = -0.3 + 0.5 * 0.5 = -0.05
    # returns = A + V = [0.45, 0.7, 1.0]; padding -> 0.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.4, 7.0]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0, 0.0]], dtype=torch.float64))


def test_gae_response_of_length_one():
    # One real token: A0 = r0 + 0 - V0 = 2 - 0.5 = 1.5, return = 2 (just the reward).
    adv, ret = gae(
        torch.tensor([[2.0, 3.0, 3.0]]), torch.tensor([[0.5, 9.0, 9.0]]), torch.tensor([[1, 0, 0]])
    )
    assert adv.tolist() == [[1.5, 0.0, 0.0]]
    assert ret.tolist() == [[2.0, 0.0, 0.0]]


def test_gae_discount_with_lambda_one_is_discounted_return():
    # lam = 1, V = 0: A_t is the discounted return. r = [1, 2], gamma 0.9 -> A0 = 1 + 0.9 * 2 = 2.8, A1 = 2.
    adv, ret = gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.8, 2.0]]))
    torch.testing.assert_close(ret, adv)


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_plain_loop(seed):
    rng = random.Random(seed)
    batch, width = 6, 11
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    lengths = [rng.randint(0, width) for _ in range(batch)]
    lengths[0] = width  # a full row
    lengths[1] = 1  # a response of length one
    rewards = [[rng.gauss(0, 1) for _ in range(width)] for _ in range(batch)]
    values = [[rng.gauss(0, 1) for _ in range(width)] for _ in range(batch)]
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values), mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, torch.tensor(ref_ret), atol=1e-5, rtol=1e-5)


def test_gae_is_detached_and_returns_use_raw_advantages():
    rewards = torch.randn(3, 5, requires_grad=True)
    values = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask)
    assert not adv.requires_grad and not ret.requires_grad
    # docs/ppo_details.md item 16: returns - values are the raw advantages, and whitening afterwards leaves
    # the returns untouched (they are a separate tensor).
    torch.testing.assert_close(ret - values.detach() * mask, adv)
    before = ret.clone()
    white = masked_whiten(adv, mask)
    assert not torch.allclose(white, adv)
    assert torch.equal(ret, before)


def test_gae_ignores_padding_garbage():
    mask = torch.tensor([[1, 1, 0]])
    clean = gae(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.3, 0.1, 0.0]]), mask)
    dirty = gae(torch.tensor([[1.0, 2.0, float("nan")]]), torch.tensor([[0.3, 0.1, float("inf")]]), mask)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


def test_gae_hole_in_mask_acts_as_episode_end():
    # Documented behaviour for a non-contiguous mask [1, 0, 1] (gamma 1, lam 0.95):
    # t=2: A2 = 2 - 0.3 = 1.7. t=0: its successor is padding, so it is terminal: A0 = 1 - 0.5 = 0.5
    # (no bootstrap from V2 and no advantage leaking across the hole).
    adv, _ = gae(torch.tensor([[1.0, 9.0, 2.0]]), torch.tensor([[0.5, 9.0, 0.3]]), torch.tensor([[1, 0, 1]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 1.7]]))


# --- REINFORCE++: discounted returns whitened over the batch ---------------------------------------------

# gamma = 0.5. Row 0: r = [1, 0, 2], then padding holding 9: G2 = 2, G1 = 0 + 0.5 * 2 = 1,
# G0 = 1 + 0.5 * 1 = 1.5. Row 1: r = [0, 4], then padding: G1 = 4, G0 = 0 + 0.5 * 4 = 2.
RP_REWARDS = torch.tensor([[1.0, 0.0, 2.0, 9.0], [0.0, 4.0, 9.0, 9.0]], dtype=torch.float64)
RP_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
RP_RETURNS = [[1.5, 1.0, 2.0, 0.0], [2.0, 4.0, 0.0, 0.0]]


def test_discounted_returns_by_hand():
    assert discounted_returns(RP_REWARDS, RP_MASK, gamma=0.5).tolist() == RP_RETURNS


def test_reinforce_pp_whitens_returns_over_the_whole_batch():
    # Real returns [1.5, 1, 2, 2, 4]: mean 2.1, deviations [-0.6, -1.1, -0.1, -0.1, 1.9],
    # biased variance (0.36 + 1.21 + 0.01 + 0.01 + 3.61) / 5 = 1.04. Whitened per row instead, row 1's
    # two tokens would be -+1: the batch statistics are what is tested.
    adv, ret = reinforce_pp_advantages(RP_REWARDS, RP_MASK, gamma=0.5)
    assert ret.tolist() == RP_RETURNS
    std = (1.04 + 1e-8) ** 0.5
    expected = torch.tensor([[-0.6, -1.1, -0.1, 0.0], [-0.1, 1.9, 0.0, 0.0]], dtype=torch.float64) / std
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_is_detached_and_gamma_one_sums_the_rest_of_the_response():
    rewards = torch.tensor([[0.5, -0.5, 3.0]], requires_grad=True)
    adv, ret = reinforce_pp_advantages(rewards, torch.ones(1, 3), gamma=1.0)
    assert ret.tolist() == [[3.0, 2.5, 3.0]]
    assert not adv.requires_grad and not ret.requires_grad
