"""Pretraining loss of a model directory on held-out pretraining text: the alignment tax of SFT and PPO."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from trainers.algos import logprobs_from_logits, shift_for_lm
from trainers.data import read_records
from trainers.data.collate import left_pad, position_ids_from_mask, text_windows
from trainers.errors import DataError
from trainers.evaluation.generation import load_causal_lm

DEFAULT_PRETRAIN_MAX_LEN = 256
"""Window length of :func:`pretrain_loss`: ``model.max_len``'s default, the pretrain stage's windows."""


@torch.no_grad()
def next_token_logprobs(
    model, seqs: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob of token t+1 given its prefix (B, T-1), attention mask (B, T))`` of ``seqs``, left-padded
    into one batch on the model's device, positions from the mask (the forward every evaluation uses)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(seqs, pad_id)  # (B, T)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits  # (B, T, V)
    logits, labels = shift_for_lm(logits, input_ids)  # (B, T-1, V), (B, T-1)
    return logprobs_from_logits(logits, labels), attention_mask


@torch.no_grad()
def lm_loss_on(model, pieces: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> float:
    """Token-mean next-token loss over all pieces (each piece's first token is context only)."""
    nll_sum, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        logp, attention_mask = next_token_logprobs(model, pieces[start : start + batch_size], pad_id)
        target = (
            attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        )  # (B, T-1): real token and context
        # where, not a product: a padding row's log-prob may be nan, and nan * 0 is nan.
        nll_sum += float(-torch.where(target, logp, torch.zeros_like(logp)).sum())
        count += int(target.sum())
    return nll_sum / max(1, count)


def pretrain_loss(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    max_len: int = DEFAULT_PRETRAIN_MAX_LEN,
    batch_size: int = 16,
    device: str | None = None,
) -> float:
    """Token-mean LM loss (nats) of the model on pretraining ``texts`` (e.g. ``pretrain/valid``).

    Compare base, SFT, PPO and PPO-ptx with the same texts and ``max_len`` for the alignment tax.
    """
    if not texts:
        raise DataError("pretraining loss of zero texts")
    model, tok = load_causal_lm(model_dir, device)
    return lm_loss_on(model, text_windows(tok, texts, max_len), tok.pad_token_id, batch_size)


def read_texts(path: str | Path) -> list[str]:
    """The ``text`` field of a validated pretraining file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pretraining file '{p}' does not exist")
    return [r["text"] for r in read_records("pretrain", [p])]
