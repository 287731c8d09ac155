"""Group advantages, constant groups and token broadcasting (trainers/algos/groups.py)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.algos import (
    GROUP_KINDS,
    AlgoConfigError,
    broadcast_to_tokens,
    group_advantages,
    group_is_constant,
)
from trainers.errors import ConfigError

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0])
R2 = 1 / math.sqrt(2)


# scores [1, 2, 3, 6], groups of 2: [1, 2] and [3, 6], means 1.5 and 4.5, centred [-0.5, 0.5, -1.5, 1.5].
# Unbiased stds: sqrt(0.5) and sqrt(4.5), so GRPO gives +-1/sqrt(2) in both groups (the biased std,
# 0.5 and 1.5, would give +-1). RLOO with G = 2: the baseline is the other sample: [1-2, 2-1, 3-6, 6-3].
# One group of 4: mean 3, centred [-2, -1, 0, 3], unbiased variance 14/3 (biased 14/4);
# RLOO: 1 - (2+3+6)/3 = -8/3, 2 - (1+3+6)/3 = -4/3, 3 - (1+2+6)/3 = 0, 6 - (1+2+3)/3 = 4.
@pytest.mark.parametrize(
    ("kind", "group_size", "expected"),
    [
        ("grpo", 2, [-R2, R2, -R2, R2]),
        ("dr_grpo", 2, [-0.5, 0.5, -1.5, 1.5]),
        ("reinforce_pp_baseline", 2, [-0.5, 0.5, -1.5, 1.5]),
        ("rloo", 2, [-1.0, 1.0, -3.0, 3.0]),
        ("grpo", 4, [v / math.sqrt(14 / 3) for v in (-2.0, -1.0, 0.0, 3.0)]),
        ("dr_grpo", 4, [-2.0, -1.0, 0.0, 3.0]),
        ("reinforce_pp_baseline", 4, [-2.0, -1.0, 0.0, 3.0]),
        ("rloo", 4, [-8 / 3, -4 / 3, 0.0, 4.0]),
    ],
)
def test_group_advantages_by_hand(kind, group_size, expected):
    got = group_advantages(SCORES, group_size, kind)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_grpo_uses_the_unbiased_std():
    got = group_advantages(SCORES, 4, "grpo")
    centred = SCORES - SCORES.mean()
    biased = centred / (SCORES.std(correction=0) + 1e-6)
    assert not torch.allclose(got, biased, atol=1e-3)  # the two conventions differ by sqrt(4/3) here
    torch.testing.assert_close(got, centred / (math.sqrt(14 / 3) + 1e-6))


@pytest.mark.parametrize("seed", range(3))
def test_rloo_equals_leave_one_out_mean_computed_with_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    group_size, prompts = 5, 3
    scores = torch.randn(group_size * prompts, generator=g, dtype=torch.float64)
    expected = []
    for p in range(prompts):
        group = scores[p * group_size : (p + 1) * group_size].tolist()
        for i, s in enumerate(group):
            others = group[:i] + group[i + 1 :]
            expected.append(s - sum(others) / len(others))
    got = group_advantages(scores, group_size, "rloo")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_a_group_of_equal_scores_gives_exactly_zero(kind):
    # Seven times 0.1 in float32: s - mean(s) is 7.5e-9, not 0, so the zero must be explicit (and GRPO
    # would divide that rounding error by a std of about 1e-8 + 1e-6).
    scores = torch.tensor([0.1] * 7 + [0.7, 0.2, 0.4, 0.9, 0.0, 0.5, 0.3])
    got = group_advantages(scores, 7, kind)
    assert got[:7].tolist() == [0.0] * 7
    assert torch.all(got[7:] != 0)
    assert torch.isfinite(got).all()


def test_group_is_constant_marks_groups_with_max_equal_min():
    scores = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0, 5.0, 0.0, 1e-7])
    assert group_is_constant(scores, 2).tolist() == [True, False, True, False]
    assert group_is_constant(scores[:4], 4).tolist() == [False]


def test_group_advantages_are_detached_and_upcast():
    scores = torch.tensor([1.0, 2.0, 4.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    got = group_advantages(scores, 2, "dr_grpo")
    assert got.dtype == torch.float32 and not got.requires_grad
    assert got.tolist() == [-0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize(("n", "group_size"), [(4, 1), (4, 0), (5, 2), (6, 4)])
def test_bad_group_size_is_a_config_error(n, group_size):
    with pytest.raises(AlgoConfigError, match="group_size"):
        group_advantages(torch.zeros(n), group_size, "grpo")
    with pytest.raises(AlgoConfigError):
        group_is_constant(torch.zeros(n), group_size)


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown group estimator 'ppo'"):
        group_advantages(SCORES, 2, "ppo")


def test_broadcast_to_tokens_with_one_token_and_empty_responses():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]])
    got = broadcast_to_tokens(torch.tensor([2.0, -1.0, 5.0, 0.5]), mask)
    assert got.tolist() == [[2.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]


def test_group_of_two_one_token_responses_end_to_end():
    # Two samples of one prompt, each a single token: GRPO gives -+1/sqrt(2) on that token only.
    adv = broadcast_to_tokens(
        group_advantages(torch.tensor([0.0, 1.0]), 2, "grpo"), torch.tensor([[1, 0], [1, 0]])
    )
    torch.testing.assert_close(adv, torch.tensor([[-R2, 0.0], [R2, 0.0]]), atol=1e-5, rtol=0)


def test_broadcast_to_tokens_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="seq_values"):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 4))
