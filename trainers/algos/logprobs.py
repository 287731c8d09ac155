"""Token log-probabilities and entropies from logits (docs/ppo_details.md items 3, 5, 27).

Every log-prob in the system (policy, reference, old log-probs, training passes) goes through
:func:`logprobs_from_logits` with the sampling temperature, so all of them describe the distribution
vLLM sampled from (item 3: divide the logits by T everywhere).

Memory: logits are ``(B, T, V)`` with V up to ~150k. Both functions work one row at a time in float32,
so the no-grad passes (reference, old log-probs) never hold more than one ``(T, V)`` float32 copy on
top of the logits. Under autograd each row's log-softmax is kept for backward, as with any
cross-entropy.
"""

from __future__ import annotations

import torch

from trainers.algos._common import upcast


def _check(logits: torch.Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _scaled(row: torch.Tensor, temperature: float) -> torch.Tensor:
    """One row of logits, ``(T, V)``, in at least float32 and divided by the temperature."""
    z = upcast(row)
    return z if temperature == 1.0 else z / temperature


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``(B, T)`` ``log softmax(logits / temperature)`` gathered at ``labels``.

    ``logits[:, t]`` must already predict ``labels[:, t]`` (see :func:`shift_for_lm`), and every label
    must be a valid token id: replace ignore markers (e.g. -100) before calling and mask the result.
    """
    _check(logits, temperature)
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    rows = []
    for row, row_labels in zip(logits, labels):  # (T, V), (T,)
        logp = torch.log_softmax(_scaled(row, temperature), dim=-1)  # (T, V)
        rows.append(logp.gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(B, T)`` entropy of ``softmax(logits / temperature)`` at each position, in nats.

    Tokens with probability 0 (logit -inf, e.g. masked vocabulary padding) contribute 0, not nan.
    """
    _check(logits, temperature)
    rows = []
    for row in logits:  # (T, V)
        logp = torch.log_softmax(_scaled(row, temperature), dim=-1)  # (T, V)
        p = logp.exp()
        # Select before multiplying: 0 * -inf is nan, in the forward pass and in the gradient.
        safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=p.dtype, device=p.device))
        rows.append(-(p * safe_logp).sum(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def shift_for_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets: position t predicts token t + 1.

    ``logits (B, L, V)`` and ``labels (B, L)`` (the input ids, with ignored positions marked) become
    ``(B, L-1, V)`` and ``(B, L-1)``. The loss functions here expect already-aligned inputs.
    """
    return logits[:, :-1, :], labels[:, 1:]
