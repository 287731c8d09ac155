"""Token log-probabilities and entropies from logits (docs/ppo_details.md items 3, 5, 27).

Every log-prob in the system (policy, reference, old log-probs, training passes) goes through
:func:`logprobs_from_logits` with the sampling temperature, so all of them describe the distribution
vLLM sampled from (item 3: divide the logits by T everywhere).

Memory (docs/design.md, "Memory (issue 17)"): logits are ``(B, T, V)`` with V up to ~150k, in bf16 on a
GPU. Without ``chunk_size`` both functions work one row at a time in float32 and, under autograd, keep
each row's float32 log-softmax for backward: a float32 ``(B, T, V)`` copy in all (twice the bf16 logits).
With ``chunk_size`` they work on ``(chunk, V)`` slices of a row and a custom autograd function keeps only
the logits themselves (which the caller holds anyway) and recomputes each slice's softmax in backward, so
at most one float32 ``(chunk, V)`` slice (and its gradient) exists at a time, with or without grad. Both
paths do the same float32 operations per position; the chunked one equals the plain one to float32
rounding (tests/unit/test_algos_logprobs.py).
"""

from __future__ import annotations

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


class _ChunkedLogprobs(torch.autograd.Function):
    """``log softmax(logits / t)`` at ``labels``, slice by slice; backward recomputes each slice's softmax:
    ``d logp / dz = onehot(label) - softmax(z)``, divided by ``t``."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk):
        out = _out(logits)
        for b, pos in _spans(logits, chunk):
            logp = torch.log_softmax(_scaled(logits[b, pos], temperature), dim=-1)  # (c, V)
            out[b, pos] = logp.gather(-1, labels[b, pos].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, labels)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, pos in _spans(logits, ctx.chunk):
            p = torch.log_softmax(_scaled(logits[b, pos], ctx.temperature), dim=-1).exp()  # (c, V)
            g = grad_out[b, pos].unsqueeze(-1).to(p.dtype)  # (c, 1)
            gz = (-p * g).scatter_add_(-1, labels[b, pos].unsqueeze(-1), g)
            grad[b, pos] = (gz if ctx.temperature == 1.0 else gz / ctx.temperature).to(grad.dtype)
        return grad, None, None, None


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy of ``softmax(logits / t)``, slice by slice; backward recomputes each slice's softmax:
    ``dH / dz_j = -p_j (log p_j + H)``, divided by ``t`` (0 where ``p_j`` is 0)."""

    @staticmethod
    def forward(ctx, logits, temperature, chunk):
        out = _out(logits)
        for b, pos in _spans(logits, chunk):
            logp = torch.log_softmax(_scaled(logits[b, pos], temperature), dim=-1)  # (c, V)
            p, safe_logp = _probs(logp)
            out[b, pos] = -(p * safe_logp).sum(-1)
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, pos in _spans(logits, ctx.chunk):
            logp = torch.log_softmax(_scaled(logits[b, pos], ctx.temperature), dim=-1)  # (c, V)
            p, safe_logp = _probs(logp)
            gz = -p * (safe_logp + entropy[b, pos].unsqueeze(-1))
            gz = gz * grad_out[b, pos].unsqueeze(-1).to(gz.dtype)
            grad[b, pos] = (gz if ctx.temperature == 1.0 else gz / ctx.temperature).to(grad.dtype)
        return grad, None, None


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
        return _ChunkedLogprobs.apply(logits, labels.long(), float(temperature), chunk)
    rows = []
    for row, row_labels in zip(logits, labels):  # (T, V), (T,)
        logp = torch.log_softmax(_scaled(row, temperature), dim=-1)  # (T, V)
        rows.append(logp.gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1))  # (T,)
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
        return _ChunkedEntropy.apply(logits, float(temperature), chunk)
    rows = []
    for row in logits:  # (T, V)
        p, safe_logp = _probs(torch.log_softmax(_scaled(row, temperature), dim=-1))  # (T, V) each
        rows.append(-(p * safe_logp).sum(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def shift_for_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets: position t predicts token t + 1.

    ``logits (B, L, V)`` and ``labels (B, L)`` (the input ids, with ignored positions marked) become
    ``(B, L-1, V)`` and ``(B, L-1)``. The loss functions here expect already-aligned inputs.
    """
    return logits[:, :-1, :], labels[:, 1:]
