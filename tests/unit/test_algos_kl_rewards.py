"""KL estimators, reward shaping, score normalisation, overlong penalty and combined reward sources
(trainers/algos/kl.py, rewards.py)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.algos import (
    AlgoConfigError,
    combine_scores,
    kl_estimate,
    mean_sequence_kl,
    normalize_scores,
    overlong_penalty,
    shape_rewards,
)
from trainers.errors import ConfigError, UserError

LP = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
# d = lp - ref = [0.5, -1.0]


def test_k1_by_hand():
    # k1 = d
    torch.testing.assert_close(kl_estimate(LP, REF, "k1"), torch.tensor([[0.5, -1.0]], dtype=torch.float64))


def test_k2_by_hand():
    # k2 = d^2 / 2 = [0.125, 0.5]
    torch.testing.assert_close(kl_estimate(LP, REF, "k2"), torch.tensor([[0.125, 0.5]], dtype=torch.float64))


def test_k3_by_hand():
    # k3 = exp(-d) - 1 + d: d = 0.5 -> e^-0.5 - 0.5 = 0.1065306597; d = -1 -> e - 2 = 0.7182818285
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_estimate(LP, REF, "k3"), expected)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_identical_policy_and_reference_give_zero_kl(kind):
    # docs/ppo_details.md item 25: at step 0 the policy is the reference, so every estimator is exactly 0.
    lp = torch.randn(4, 9, generator=torch.Generator().manual_seed(1)) - 3
    assert torch.equal(kl_estimate(lp, lp.clone(), kind), torch.zeros_like(lp))


def test_k2_k3_never_negative_and_k1_can_be():
    g = torch.Generator().manual_seed(2)
    lp, ref = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    assert (kl_estimate(lp, ref, "k2") >= 0).all()
    assert (kl_estimate(lp, ref, "k3") >= 0).all()
    assert (kl_estimate(lp, ref, "k1") < 0).any()


def test_kl_mask_zeroes_padding_and_bf16_is_upcast():
    lp = torch.tensor([[-1.0, float("nan")]], dtype=torch.bfloat16)
    ref = torch.tensor([[-2.0, 0.0]], dtype=torch.bfloat16)
    out = kl_estimate(lp, ref, "k1", mask=torch.tensor([[1, 0]]))
    assert out.dtype == torch.float32
    assert out.tolist() == [[1.0, 0.0]]


def test_unknown_kind_is_a_value_error_and_a_config_error():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(LP, REF, "k4")
    with pytest.raises(ConfigError):
        kl_estimate(LP, REF, "kl")
    assert issubclass(AlgoConfigError, UserError)


def test_mean_sequence_kl_by_hand():
    # Per-sequence sums over real tokens: row 0 -> 0.5 - 1 = -0.5 (9 is padding), row 1 -> 2; mean 0.75.
    kl = torch.tensor([[0.5, -1.0, 9.0], [2.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_sequence_kl(kl, mask).item() == pytest.approx(0.75)


def test_shape_rewards_by_hand():
    # coef 0.1: every real token gets -0.1 * kl; the last real token also gets the score.
    # row 0 (2 tokens):  [-0.05, -0.1 + 10, 0]
    # row 1 (1 token):   [-0.1 + 20, 0, 0]          (response of length 1: penalty and score together)
    # row 2 (no token):  [0, 0, 0]                  (no action, so neither penalty nor score)
    scores = torch.tensor([10.0, 20.0, 30.0])
    kl = torch.tensor([[0.5, 1.0, float("inf")], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    rewards = shape_rewards(scores, kl, mask, 0.1)
    expected = torch.tensor([[-0.05, 9.9, 0.0], [19.9, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_shape_rewards_uses_last_set_position_not_length():
    # A left-padded row: its last real token is index 2, not mask.sum() - 1 = 1.
    rewards = shape_rewards(torch.tensor([1.0]), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), 0.5)
    assert rewards.tolist() == [[0.0, 0.0, 1.0]]


def test_shape_rewards_rejects_wrong_score_shape():
    with pytest.raises(ValueError, match="scores shape"):
        shape_rewards(torch.zeros(2, 1), torch.zeros(2, 3), torch.ones(2, 3), 0.1)


def test_normalize_scores():
    s = torch.tensor([1.0, 2.0, 3.0])
    # Identity by default.
    assert torch.equal(normalize_scores(s), s)
    # Whiten: mean 2, biased std sqrt(2/3) -> [-1.2247, 0, 1.2247]; then clip at 1 -> [-1, 0, 1].
    torch.testing.assert_close(
        normalize_scores(s, whiten=True), torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5)
    )
    torch.testing.assert_close(normalize_scores(s, whiten=True, clip=1.0), torch.tensor([-1.0, 0.0, 1.0]))
    # Clip alone.
    assert normalize_scores(torch.tensor([-5.0, 0.5, 5.0]), clip=2.0).tolist() == [-2.0, 0.5, 2.0]
    with pytest.raises(ValueError):
        normalize_scores(s, clip=0.0)


# --- DAPO soft overlong punishment --------------------------------------------------------------------------


def test_overlong_penalty_at_the_boundaries():
    # max 20, buffer 4: free up to 16 tokens, then -1/4 per token, -1 at 20 and beyond.
    lengths = torch.tensor([0, 16, 17, 18, 20, 25])
    got = overlong_penalty(lengths, max_new_tokens=20, buffer=4, penalty=1.0)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4, penalty=2.0).tolist() == [0.0, 0.0, -0.5, -1.0, -2.0, -2.0]
    # The buffer may be the whole length: linear from 0 tokens.
    assert overlong_penalty(torch.tensor([0, 10, 20]), 20, 20, 1.0).tolist() == [0.0, -0.5, -1.0]


def test_overlong_penalty_off_and_bad_settings():
    assert overlong_penalty(torch.tensor([3, 20, 30]), 20, 0, 1.0).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(AlgoConfigError, match="buffer"):
        overlong_penalty(torch.tensor([3]), 20, 21, 1.0)
    with pytest.raises(AlgoConfigError, match="buffer"):
        overlong_penalty(torch.tensor([3]), 20, -1, 1.0)
    with pytest.raises(AlgoConfigError, match="penalty"):
        overlong_penalty(torch.tensor([3]), 20, 4, -1.0)


# --- several reward sources -------------------------------------------------------------------------------------


def test_combine_scores_weighs_each_source_and_unnamed_sources_weigh_one():
    scores = {
        "rm": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        "function": torch.tensor([0.0, 1.0]),
        "url": torch.tensor([4.0, 4.0]),
    }
    got = combine_scores(scores, {"rm": 0.5, "function": 2.0})
    assert got.dtype == torch.float32
    assert got.tolist() == [0.5 * 1 + 2 * 0 + 4, 0.5 * 2 + 2 * 1 + 4]  # [4.5, 7.0]
    assert combine_scores({"rm": scores["url"]}, {}).tolist() == [4.0, 4.0]


def test_combine_scores_errors():
    scores = {"rm": torch.zeros(3), "function": torch.zeros(3)}
    with pytest.raises(AlgoConfigError, match="'url'") as err:
        combine_scores(scores, {"rm": 1.0, "url": 0.5})
    assert isinstance(err.value, ConfigError)
    with pytest.raises(ValueError, match="shape"):
        combine_scores({"rm": torch.zeros(3), "function": torch.zeros(4)}, {})
    with pytest.raises(ValueError, match="at least one"):
        combine_scores({}, {})
