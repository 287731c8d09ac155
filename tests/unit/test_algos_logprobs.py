"""Log-probs, entropy and LM alignment (trainers/algos/logprobs.py)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.algos import entropy_from_logits, logprobs_from_logits, shift_for_lm

LN3 = math.log(3.0)


def test_logprobs_by_hand():
    # Position 0: logits [0, 0] -> p = [1/2, 1/2]; label 0 -> log(1/2).
    # Position 1: logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> log(3/4).
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN3]]], dtype=torch.float64)
    out = logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(0.75)]], dtype=torch.float64))


def test_temperature_divides_logits():
    # logits [0, 2 ln 3] at T = 2 are [0, ln 3] -> log p(label 1) = log(3/4) (docs/ppo_details.md item 3).
    logits = torch.tensor([[[0.0, 2 * LN3]]], dtype=torch.float64)
    out = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    assert out.item() == pytest.approx(math.log(0.75))
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.9))


def test_logprobs_match_full_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g) * 4
    labels = torch.randint(0, 7, (3, 4), generator=g)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, temperature=0.7), expected)


def test_bf16_logits_are_computed_in_float32():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    labels = torch.zeros(2, 3, dtype=torch.long)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logprobs_from_logits(logits.float(), labels))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature)


def test_entropy_by_hand():
    # Uniform over 4 -> ln 4. p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446.
    # A certain token (others at -inf) -> 0, not nan. [0, 2 ln 3] at T = 2 equals [0, ln 3].
    h_quarter = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -math.inf, -math.inf], [0.0, -math.inf, -math.inf, -math.inf]]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(
        entropy_from_logits(logits), torch.tensor([[math.log(4), h_quarter, 0.0]], dtype=torch.float64)
    )
    hot = torch.tensor([[[0.0, 2 * LN3]]], dtype=torch.float64)
    assert entropy_from_logits(hot, temperature=2.0).item() == pytest.approx(h_quarter)


def test_entropy_grad_is_finite_with_masked_vocabulary():
    logits = torch.tensor([[[1.0, 2.0, -math.inf]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, :2].abs().sum() > 0


def test_shift_for_lm_aligns_position_t_with_token_t_plus_1():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    shifted_logits, targets = shift_for_lm(logits, ids)
    assert shifted_logits.shape == (2, 3, 3) and targets.shape == (2, 3)
    assert torch.equal(shifted_logits[:, 0], logits[:, 0])  # output at position 0 ...
    assert targets[:, 0].tolist() == [6, 2]  # ... predicts the token at position 1
