"""trainers/ppo/experience.py: KL, shaped rewards, GAE and whitening wired together, worked out by hand."""

from __future__ import annotations

import math

import pytest
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


# --- the critic-free estimators (docs/ppo_details.md item 31) ------------------------------------------


def _whiten(values: list[float]) -> list[float]:
    """``(v - mean) / sqrt(population variance + 1e-8)`` of a plain list (item 17, by hand)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def _group_passes() -> tuple[torch.Tensor, ExperiencePasses]:
    """Two prompts x 2 samples, padded responses, k1 KL 0.5 on row 0 and 1.0 on row 3 (sums per row)."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    old = torch.tensor([[-1.0, -1.0, 7.0], [-2.0, 7.0, 7.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, 7.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    return mask, ExperiencePasses(old, ref, scores, values=torch.full((4, 3), 9.0))


# Sequence totals = score - beta * sum(kl) with beta 0.5: [1 - 0.25, 0, 2, 2 - 0.5] = [0.75, 0, 2, 1.5];
# groups [0.75, 0] and [2, 1.5]: centred [0.375, -0.375] and [0.25, -0.25].
GROUP_EXPECTED = {
    # unbiased std of two values a, b is |a - b| / sqrt(2): every advantage of a pair is +-1/sqrt(2)
    "grpo": [
        0.375 / (0.75 / math.sqrt(2) + 1e-6),
        -0.375 / (0.75 / math.sqrt(2) + 1e-6),
        0.25 / (0.5 / math.sqrt(2) + 1e-6),
        -0.25 / (0.5 / math.sqrt(2) + 1e-6),
    ],
    "dr_grpo": [0.375, -0.375, 0.25, -0.25],
    "rloo": [0.75 - 0.0, 0.0 - 0.75, 2.0 - 1.5, 1.5 - 2.0],  # minus the mean of the other samples
}


@pytest.mark.parametrize("estimator", sorted(GROUP_EXPECTED))
def test_group_estimators_put_the_kl_shaped_sequence_advantage_on_every_real_token(estimator):
    mask, passes = _group_passes()
    adv = experience.compute_advantages(
        mask, passes, kl_coef=0.5, estimator=estimator, group_size=2, gamma=1.0, lam=1.0
    )
    per_row = GROUP_EXPECTED[estimator]
    expected = torch.tensor(per_row).unsqueeze(1) * mask  # (N, R): 0 on padding
    assert torch.allclose(adv.advantages, expected, atol=1e-6)
    assert adv.advantages[1, 1:].tolist() == [0.0, 0.0]  # padding stays exactly 0
    assert adv.values is None and adv.returns is None  # critic-free: nothing to regress on
    # the rewards are the same KL-shaped token rewards GAE would see
    assert adv.rewards.tolist() == [[-0.25, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.5, 0.0]]


def test_group_estimators_without_the_kl_in_the_reward_compare_the_scores():
    """kl_coef 0 (the KL lives in the loss instead): group sizes of 3, hand-computed per estimator."""
    mask = torch.ones(3, 2)
    old = torch.zeros(3, 2)
    passes = ExperiencePasses(old, old - 1.0, torch.tensor([1.0, 2.0, 6.0]))  # kl 1 everywhere, ignored
    run = {
        e: experience.compute_advantages(mask, passes, 0.0, estimator=e, group_size=3).advantages[:, 0]
        for e in ("grpo", "dr_grpo", "rloo")
    }
    # mean 3, centred [-2, -1, 3]; unbiased variance (4 + 1 + 9) / 2 = 7
    assert torch.allclose(run["dr_grpo"], torch.tensor([-2.0, -1.0, 3.0]))
    assert torch.allclose(run["grpo"], torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7) + 1e-6))
    assert torch.allclose(run["rloo"], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_a_group_of_equal_totals_gets_exactly_zero_advantage():
    mask = torch.ones(4, 1)
    zeros = torch.zeros(4, 1)
    passes = ExperiencePasses(zeros, zeros, torch.tensor([0.3, 0.3, 1.0, 0.0]))
    for estimator in ("grpo", "dr_grpo", "rloo"):
        adv = experience.compute_advantages(mask, passes, 0.1, estimator=estimator, group_size=2)
        assert adv.advantages[:2].tolist() == [[0.0], [0.0]], estimator
        assert adv.advantages[2, 0] > 0 > adv.advantages[3, 0], estimator


def test_reinforce_pp_whitens_the_discounted_returns_of_the_shaped_rewards():
    # rewards [[-0.25, 1, pad], [-1, pad, pad]] (beta 0.5, k1 0.5 on the first token of row 0)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    old = torch.tensor([[-1.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    passes = ExperiencePasses(old, ref, torch.tensor([1.0, -1.0]))
    adv = experience.compute_advantages(mask, passes, 0.5, estimator="reinforce_pp", gamma=0.5)
    # gamma 0.5: G = [[-0.25 + 0.5 * 1, 1], [-1]] = [[0.25, 1], [-1]], whitened over the 3 real tokens
    a, b, c = _whiten([0.25, 1.0, -1.0])
    assert torch.allclose(adv.advantages, torch.tensor([[a, b, 0.0], [c, 0.0, 0.0]]), atol=1e-6)
    assert adv.values is None and adv.returns is None
    used = torch.tensor([1.0, -1.0])
    kl = adv.kl
    _, _, returns = experience.estimate("reinforce_pp", used, kl, mask, None, 0.5, 0.5, 0.95, 1)
    assert torch.allclose(returns, torch.tensor([[0.25, 1.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_reinforce_pp_baseline_puts_the_group_centred_score_on_the_last_token():
    """Scores [3, 1 | 0, 0] -> centred [1, -1 | 0, 0] at each row's last real token, beta 0, gamma 1:
    returns [[1, 1], [-1, pad], [0, 0], [0, 0]], whitened over the 7 real tokens."""
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    zeros = torch.zeros(4, 2)
    passes = ExperiencePasses(zeros, zeros, torch.tensor([3.0, 1.0, 0.0, 0.0]))
    adv = experience.compute_advantages(
        mask, passes, 0.0, estimator="reinforce_pp_baseline", group_size=2, gamma=1.0
    )
    assert adv.rewards.tolist() == [[0.0, 1.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    w = _whiten([1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    expected = torch.tensor([[w[0], w[1]], [w[2], 0.0], [w[3], w[4]], [w[5], w[6]]])
    assert torch.allclose(adv.advantages, expected, atol=1e-6)
    assert adv.scores.tolist() == [3.0, 1.0, 0.0, 0.0]  # the logged used score is not the centred one
    assert adv.values is None and adv.returns is None


def test_gae_needs_values_and_an_unknown_estimator_is_refused():
    mask, zeros = torch.ones(2, 1), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="needs the critic's values"):
        experience.compute_advantages(mask, ExperiencePasses(zeros, zeros, torch.ones(2)), 0.1)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        experience.compute_advantages(
            mask, ExperiencePasses(zeros, zeros, torch.ones(2)), 0.1, estimator="ppo"
        )
    assert set(experience.ESTIMATORS) == {
        "gae",
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
    }


# --- the used score: clip -> missing-stop penalty -> overlong shaping ------------------------------------


def test_overlong_shaping_is_zero_up_to_the_buffer_then_linear_to_the_penalty():
    """max_new_tokens 8, buffer 4, penalty 1: lengths 3 and 4 (at the buffer's start) untouched, 6 is two
    tokens in (-0.5), 7 (-0.75), 8 at the limit (-1)."""
    lengths = [3, 4, 6, 7, 8]
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    shaping = experience.ScoreShaping(overlong_buffer=4, overlong_penalty=1.0, max_new_tokens=8)
    used, penalised = experience.used_scores(torch.ones(5), mask, shaping)
    assert torch.allclose(used, torch.tensor([1.0, 1.0, 0.5, 0.25, 0.0]))
    assert not penalised.any()  # the overlong shaping is not the missing-stop penalty
    half = experience.ScoreShaping(overlong_buffer=4, overlong_penalty=0.5, max_new_tokens=8)
    assert torch.allclose(
        experience.used_scores(torch.ones(5), mask, half)[0], torch.tensor([1, 1, 0.75, 0.625, 0.5])
    )
    off = experience.ScoreShaping(max_new_tokens=8)
    assert experience.used_scores(torch.ones(5), mask, off)[0].tolist() == [1.0] * 5


def test_overlong_shaping_comes_after_the_clip_and_the_missing_stop_penalty():
    """5 -> clip 2 -> 2 - 0.5 (truncated) -> 1.5 - 1 (at max_new_tokens): 0.5. Shaping before the clip
    would give min(5 - 1.5, 2) = 2."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    shaping = experience.ScoreShaping(
        score_clip=2.0, missing_eos_penalty=0.5, overlong_buffer=2, overlong_penalty=1.0, max_new_tokens=4
    )
    truncated = torch.tensor([True, False, False])
    used, penalised = experience.used_scores(torch.tensor([5.0, 5.0, -5.0]), mask, shaping, truncated)
    assert used.tolist() == [0.5, 1.0, -2.0]
    assert penalised.tolist() == [True, False, False]
    adv = experience.compute_advantages(
        mask,
        ExperiencePasses(
            torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([5.0, 5.0, -5.0]), torch.zeros(3, 4)
        ),
        0.0,
        truncated=truncated,
        shaping=shaping,
    )
    assert adv.scores.tolist() == [0.5, 1.0, -2.0]  # shaping= wins over the loose keyword arguments
    assert adv.rewards[:, -1].tolist() == [0.5, 1.0, 0.0] and adv.rewards[2, 0] == -2.0
