"""Token log-probabilities and entropies from logits (docs/ppo_details.md items 3, 5, 27).

Every log-prob in the system (policy, reference, old log-probs, training passes) goes through
:func:`logprobs_from_logits` with the sampling temperature, so all of them describe the distribution
vLLM sampled from (item 3: divide the logits by T everywhere).

Memory (docs/design.md, "Memory (issue 17)"): logits are ``(B, T, V)`` with V up to ~150k, in bf16 on a
GPU. Without ``chunk_size`` both functions work one row at a time in float32 and, under autograd, keep
each row's float32 log-softmax for backward: a float32 ``(B, T, V)`` copy in all (twice the bf16 logits).
With ``chunk_size`` they work on ``(chunk, V)`` slices of a row through one autograd function that keeps
only the logits themselves (which the caller holds anyway) and, in backward, recomputes one slice at a
time with autograd, so at most one float32 ``(chunk, V)`` slice and its intermediates exist at a time,
with or without grad. Both paths run the same operations per position: values and gradients are equal
(bit for bit on the CPU; tests/unit/test_algos_logprobs.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from trainers.algos._common import upcast


def _check(logits: torch.Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _scaled(row: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits ``(..., V)`` in at least float32 and divided by the temperature."""
    z = upcast(row)
    return z if temperature == 1.0 else z / temperature


def _spans(logits: torch.Tensor, chunk: int) -> Iterator[tuple[int, slice]]:
    """``(row, positions)`` of every slice of at most ``chunk`` positions, row by row."""
    steps = logits.shape[1]
    for b in range(logits.shape[0]):
        for start in range(0, steps, chunk):
            yield b, slice(start, min(start + chunk, steps))


def _probs(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, log p)`` with ``log p`` set to 0 where ``p`` is 0: select before multiplying, as ``0 * -inf`` is
    nan in the forward pass and in the gradient."""
    p = logp.exp()
    return p, torch.where(p > 0, logp, torch.zeros((), dtype=p.dtype, device=p.device))


def _out(logits: torch.Tensor) -> torch.Tensor:
    """The ``(B, T)`` result buffer, in the dtype the maths runs in (at least float32)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)


def _row_logprobs(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(n,)`` log-probs of ``labels`` under logits ``z (n, V)``: the plain path's operations."""
    logp = torch.log_softmax(_scaled(z, temperature), dim=-1)  # (n, V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _row_entropy(z: torch.Tensor, _labels: None, temperature: float) -> torch.Tensor:
    """``(n,)`` entropies under logits ``z (n, V)``: the plain path's operations."""
    p, safe_logp = _probs(torch.log_softmax(_scaled(z, temperature), dim=-1))  # (n, V) each
    return -(p * safe_logp).sum(-1)


class _Sliced(torch.autograd.Function):
    """``fn`` over ``(chunk, V)`` slices of every row of the logits, saving only the logits for backward.

    Backward recomputes each slice with autograd on and back-propagates through it alone: the very
    operations (and kernels) of the plain path on fewer positions, so the gradients are the plain path's
    bit for bit, while at most one slice's float32 intermediates exist at a time.
    """

    @staticmethod
    def forward(ctx, logits, labels, fn, chunk):
        out = _out(logits)
        for b, pos in _spans(logits, chunk):
            out[b, pos] = fn(logits[b, pos], None if labels is None else labels[b, pos])
        ctx.save_for_backward(logits, labels)
        ctx.fn, ctx.chunk = fn, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, pos in _spans(logits, ctx.chunk):
            with torch.enable_grad():
                z = logits[b, pos].detach().requires_grad_(True)
                out = ctx.fn(z, None if labels is None else labels[b, pos])
                (grad[b, pos],) = torch.autograd.grad(out, z, grad_out[b, pos])
        return grad, None, None, None


def _chunk(chunk_size: int | None) -> int | None:
    return chunk_size if chunk_size is not None and chunk_size > 0 else None


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, chunk_size: int | None = None
) -> torch.Tensor:
    """``(B, T)`` ``log softmax(logits / temperature)`` gathered at ``labels``.

    ``logits[:, t]`` must already predict ``labels[:, t]`` (see :func:`shift_for_lm`), and every label
    must be a valid token id: replace ignore markers (e.g. -100) before calling and mask the result.
    ``chunk_size``: at most this many positions of a row in float32 at a time, forward and backward (see
    the module docstring); None or <= 0: whole rows, plain autograd.
    """
    _check(logits, temperature)
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    chunk = _chunk(chunk_size)
    if chunk is not None:
        fn = functools.partial(_row_logprobs, temperature=float(temperature))
        return _Sliced.apply(logits, labels.long(), fn, chunk)
    rows = [_row_logprobs(row, lab, temperature) for row, lab in zip(logits, labels.long())]  # (T,) each
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, chunk_size: int | None = None
) -> torch.Tensor:
    """``(B, T)`` entropy of ``softmax(logits / temperature)`` at each position, in nats.

    Tokens with probability 0 (logit -inf, e.g. masked vocabulary padding) contribute 0, not nan.
    ``chunk_size`` as for :func:`logprobs_from_logits`.
    """
    _check(logits, temperature)
    chunk = _chunk(chunk_size)
    if chunk is not None:
        fn = functools.partial(_row_entropy, temperature=float(temperature))
        return _Sliced.apply(logits, None, fn, chunk)
    rows = [_row_entropy(row, None, temperature) for row in logits]  # (T,) each
    return torch.stack(rows)  # (B, T)


def shift_for_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets: position t predicts token t + 1.

    ``logits (B, L, V)`` and ``labels (B, L)`` (the input ids, with ignored positions marked) become
    ``(B, L-1, V)`` and ``(B, L-1)``. The loss functions here expect already-aligned inputs.
    """
    return logits[:, :-1, :], labels[:, 1:]
