"""Masked reductions, whitening and cross-rank moments (trainers/algos/masked.py)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.algos import (
    last_token_index,
    masked_count,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_to_mean_var,
    whiten_with,
)

# Real tokens: row 0 -> 1, 2; row 1 -> 4. Padding holds garbage that must never be read.
X = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), -float("inf")]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mask", [MASK, MASK.bool(), MASK.float()])
def test_masked_reductions_by_hand(mask):
    # Real values {1, 2, 4}: sum 7, mean 7/3,
    # biased var = ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 3 = (16/9 + 1/9 + 25/9) / 3 = 14/9.
    assert masked_sum(X, mask).item() == 7.0
    assert masked_count(mask).item() == 3
    assert masked_mean(X, mask).item() == pytest.approx(7 / 3)
    assert masked_var(X, mask).item() == pytest.approx(14 / 9)


def test_masked_reductions_along_dim():
    # Row 0: {1, 2} sum 3, mean 1.5, var 0.25. Row 1: {4} sum 4, mean 4, var 0.
    torch.testing.assert_close(masked_sum(X, MASK, dim=-1), torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(X, MASK, dim=-1), torch.tensor([1.5, 4.0], dtype=torch.float64))
    torch.testing.assert_close(masked_var(X, MASK, dim=-1), torch.tensor([0.25, 0.0], dtype=torch.float64))


def test_empty_selection_gives_zero_not_nan():
    empty = torch.zeros_like(MASK)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    assert torch.equal(masked_whiten(X, empty), torch.zeros_like(X))


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(X, MASK[:, :2])


def test_masked_whiten_by_hand():
    # mean 7/3, std sqrt(14/9) = sqrt(14)/3, so 1 -> (-4/3) / (sqrt(14)/3) = -4/sqrt(14),
    # 2 -> -1/sqrt(14), 4 -> 5/sqrt(14); padding -> 0.
    out = masked_whiten(X, MASK)
    s = math.sqrt(14)
    expected = torch.tensor([[-4 / s, -1 / s, 0.0], [5 / s, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    assert masked_mean(out, MASK).abs().item() < 1e-12
    assert masked_var(out, MASK).item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_keep_mean():
    # shift_mean=False adds the mean back: the spread is normalised, the mean (7/3) kept.
    out = masked_whiten(X, MASK, shift_mean=False)
    s = math.sqrt(14)
    assert out[0, 0].item() == pytest.approx(-4 / s + 7 / 3)
    assert masked_mean(out, MASK).item() == pytest.approx(7 / 3)
    assert out[0, 2].item() == 0.0


def test_constant_batch_whitens_to_zero():
    x = torch.full((2, 3), 5.0)
    out = masked_whiten(x, torch.ones(2, 3))
    assert torch.equal(out, torch.zeros_like(out))


def test_moments_by_hand():
    # [sum, sum of squares, count] of {1, 2, 4} = [7, 1 + 4 + 16, 3] -> mean 7/3, var 21/3 - 49/9 = 14/9.
    moments = masked_moments(X, MASK)
    assert moments.dtype == torch.float64
    assert moments.tolist() == [7.0, 21.0, 3.0]
    mean, var = moments_to_mean_var(moments)
    assert mean.item() == pytest.approx(7 / 3)
    assert var.item() == pytest.approx(14 / 9)


def test_sharded_whitening_equals_global():
    # Two "ranks" with different batch sizes and token counts; summing their moments (what all_reduce
    # does) and whitening each shard must equal whitening the concatenated batch.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 6, generator=g) * 3 + 1
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])
    mask = torch.arange(6).expand(7, 6) < lengths[:, None]
    shards = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    total = sum(masked_moments(xs, ms) for xs, ms in shards)
    mean, var = moments_to_mean_var(total)
    pieces = [whiten_with(xs, ms, mean, var) for xs, ms in shards]
    torch.testing.assert_close(torch.cat(pieces), masked_whiten(x, mask), atol=1e-5, rtol=1e-5)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    # Right padded -> 1; left padded -> 3; empty -> -1; length-one response -> 0; both sides -> 2.
    assert last_token_index(mask).tolist() == [1, 3, -1, 0, 2]
    assert last_token_index(mask.bool()).tolist() == [1, 3, -1, 0, 2]
