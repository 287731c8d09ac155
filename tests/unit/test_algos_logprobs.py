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


def _logits_with_masked_vocab(dtype=torch.float32, rows=2, steps=7, vocab=11, seed=3):
    """Random logits with a few -inf entries (masked vocabulary), and labels that avoid them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, steps, vocab, generator=g) * 3
    logits[:, :, -2:] = -math.inf  # padded vocabulary
    logits[0, 1, :4] = -math.inf  # a position with fewer live tokens
    labels = torch.randint(4, vocab - 2, (rows, steps), generator=g)
    return logits.to(dtype), labels


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])  # 3 does not divide T = 7; 1024 > T
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_the_plain_path_values_and_gradients(chunk_size, temperature):
    """docs/design.md "Memory (issue 17)": the chunked path is the plain one, to float32 rounding."""
    logits, labels = _logits_with_masked_vocab()
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(labels.shape, generator=g)  # a non-uniform upstream gradient
    results = []
    for chunk in (None, chunk_size):
        x = logits.clone().requires_grad_(True)
        out = logprobs_from_logits(x, labels, temperature, chunk_size=chunk)
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad))
    (plain, plain_grad), (chunked, chunked_grad) = results
    assert chunked.dtype == torch.float32 and torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-6)
    assert torch.isfinite(chunked_grad).all() and plain_grad.abs().sum() > 0
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=0, atol=1e-6)
    # Bit for bit: AdamW's first step turns one-ulp differences of near-zero gradients into visible updates.
    assert torch.equal(chunked, plain) and torch.equal(chunked_grad, plain_grad)
    assert torch.equal(chunked_grad[..., -2:], torch.zeros_like(chunked_grad[..., -2:]))


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_chunked_entropy_equals_the_plain_path_values_and_gradients(chunk_size, temperature):
    logits, _ = _logits_with_masked_vocab(seed=5)
    weights = torch.randn(logits.shape[:2], generator=torch.Generator().manual_seed(6))
    results = []
    for chunk in (None, chunk_size):
        x = logits.clone().requires_grad_(True)
        out = entropy_from_logits(x, temperature, chunk_size=chunk)
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad))
    (plain, plain_grad), (chunked, chunked_grad) = results
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-6)
    assert torch.isfinite(chunked_grad).all() and plain_grad.abs().sum() > 0
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=0, atol=1e-6)
    assert torch.equal(chunked, plain) and torch.equal(chunked_grad, plain_grad)


def test_chunked_bf16_logits_run_in_float32_and_return_bf16_gradients():
    logits, labels = _logits_with_masked_vocab(torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    out = logprobs_from_logits(x, labels, 0.7, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logprobs_from_logits(logits, labels, 0.7), rtol=0, atol=1e-6)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert entropy_from_logits(logits, chunk_size=2).dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [None, 0, -1])
def test_chunk_size_none_or_not_positive_is_the_plain_path(chunk_size):
    logits, labels = _logits_with_masked_vocab()
    x = logits.clone().requires_grad_(True)
    out = logprobs_from_logits(x, labels, chunk_size=chunk_size)
    assert "Sliced" not in type(out.grad_fn).__name__
    assert "Sliced" in type(logprobs_from_logits(x, labels, chunk_size=2).grad_fn).__name__
    assert torch.equal(out, logprobs_from_logits(logits, labels))


def test_chunked_passes_upcast_only_one_slice_at_a_time():
    """No float32 copy bigger than one ``(chunk, V)`` slice is made from bf16 logits, with or without
    grad: every upcast is counted through the dispatcher (the plain path upcasts whole rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Biggest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.numel = max(self.numel, t.numel())
            return out

    logits, labels = _logits_with_masked_vocab(torch.bfloat16, rows=2, steps=12, vocab=11)
    x = logits.clone().requires_grad_(True)
    with Biggest() as chunked:
        logprobs_from_logits(x, labels, 0.7, chunk_size=3).sum().backward()
        entropy_from_logits(logits, 0.7, chunk_size=3)
    with Biggest() as plain:
        logprobs_from_logits(logits, labels, 0.7)
    assert chunked.numel == 3 * 11  # one (chunk, V) float32 slice
    assert plain.numel == 12 * 11  # a whole (T, V) row
