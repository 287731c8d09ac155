"""trainers/ppo/experience.py: KL, shaped rewards, GAE and whitening wired together, worked out by hand."""

from __future__ import annotations

import math

import torch

from trainers.ppo import experience
from trainers.ppo.batch import Experience, TokenBatch
from trainers.ppo.experience import ExperiencePasses


def test_compute_advantages_hand_example():
    # Two sequences: 2 real tokens then padding, and 1. kl_coef 0.5, gamma 1, lam 1.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    old = torch.tensor([[-1.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.1, 9.0], [0.3, 9.0, 9.0]])
    scores = torch.tensor([1.0, -1.0])
    adv = experience.compute_advantages(
        mask, ExperiencePasses(old, ref, scores, values), kl_coef=0.5, gamma=1.0, lam=1.0
    )
    assert adv.kl.tolist() == [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert adv.rewards.tolist() == [[-0.25, 1.0, 0.0], [-1.0, 0.0, 0.0]]
    # gamma = lam = 1: returns = reward-to-go; advantages = returns - values (before whitening)
    assert torch.allclose(adv.returns, torch.tensor([[0.75, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    # raw advantages 0.55, 0.9, -1.3 on the real tokens: mean 0.05, population variance 2.795 / 3
    std = math.sqrt(2.795 / 3 + 1e-8)
    whitened = torch.tensor([[0.5 / std, 0.85 / std, 0.0], [-1.35 / std, 0.0, 0.0]])
    assert torch.allclose(adv.advantages, whitened, atol=1e-6)
    assert torch.equal(
        adv.values, torch.tensor([[0.2, 0.1, 0.0], [0.3, 0.0, 0.0]])
    )  # 0 past the end (item 12)
    assert adv.scores.tolist() == [1.0, -1.0]


def test_compute_advantages_score_clip():
    mask = torch.ones(2, 1)
    zeros = torch.zeros(2, 1)
    passes = ExperiencePasses(zeros, zeros, torch.tensor([5.0, -0.5]), zeros)
    adv = experience.compute_advantages(mask, passes, 0.1, score_clip=1.0)
    assert adv.scores.tolist() == [1.0, -0.5]
    assert adv.rewards.tolist() == [[1.0], [-0.5]]  # the clipped score is the one rewarded


def test_missing_eos_penalty_lowers_exactly_the_truncated_scores_before_shaping():
    """docs/ppo_details.md item 29: the penalty reaches the reward on the last real token of the truncated
    rows only; the passes' raw scores are left alone."""
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    zeros = torch.zeros(3, 2)
    raw = torch.tensor([1.0, 1.0, 0.5])
    passes = ExperiencePasses(zeros, zeros, raw, zeros)
    truncated = torch.tensor([True, False, True])
    adv = experience.compute_advantages(
        mask, passes, 0.0, truncated=truncated, missing_eos_penalty=0.75, gamma=1.0, lam=1.0
    )
    assert adv.scores.tolist() == [0.25, 1.0, -0.25]
    assert adv.penalised.tolist() == [True, False, True]
    assert adv.rewards.tolist() == [[0.0, 0.25], [1.0, 0.0], [0.0, -0.25]]
    assert adv.returns.tolist() == [[0.25, 0.25], [1.0, 0.0], [-0.25, -0.25]]
    assert raw.tolist() == [1.0, 1.0, 0.5]
    off = experience.compute_advantages(mask, passes, 0.0, truncated=truncated, missing_eos_penalty=0.0)
    assert off.scores.tolist() == [1.0, 1.0, 0.5] and not off.penalised.any()
    unknown = experience.compute_advantages(mask, passes, 0.0, truncated=None, missing_eos_penalty=0.75)
    assert unknown.scores.tolist() == [1.0, 1.0, 0.5]


def test_missing_eos_penalty_comes_after_the_score_clip():
    """A clip never cancels the penalty: 5 -> clip 1 -> 1 - 0.5."""
    mask, zeros = torch.ones(2, 1), torch.zeros(2, 1)
    passes = ExperiencePasses(zeros, zeros, torch.tensor([5.0, 5.0]), zeros)
    adv = experience.compute_advantages(
        mask, passes, 0.0, score_clip=1.0, truncated=torch.tensor([True, False]), missing_eos_penalty=0.5
    )
    assert adv.scores.tolist() == [0.5, 1.0]


def test_build_experience_takes_rollout_time_logprobs_and_the_processed_values():
    tokens = TokenBatch(
        torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2)
    )
    passes = ExperiencePasses(
        old_logprobs=torch.tensor([[-1.0, -2.0]]),
        ref_logprobs=torch.tensor([[-9.0, -9.0]]),
        scores=torch.tensor([3.0]),
        values=torch.tensor([[7.0, 7.0]]),
    )
    adv = experience.compute_advantages(tokens.response_mask, passes, kl_coef=0.0, gamma=1.0, lam=1.0)
    exp = experience.build_experience(tokens, passes, adv)
    assert isinstance(exp, Experience) and exp.tokens is tokens
    assert exp.old_logprobs is passes.old_logprobs  # the policy's own, not the reference's
    assert exp.advantages is adv.advantages and exp.values is adv.values and exp.returns is adv.returns
    assert exp.returns.tolist() == [[3.0, 3.0]]  # reward-to-go of the score, beta 0
