"""Token-level preparation: pretraining text windows, left-padded batches for LM, RM and rollouts.

Conversations become ids in the model's chat format in :mod:`trainers.data.chat`; this module batches ids.

Every batch is LEFT-padded: the last column holds the last real token of every row, which is where
generation continues (rollouts) and where the reward model reads its score (docs/ppo_details.md item 7).
Forward passes over left-padded rows must use ``position_ids_from_mask`` (item 1) so that each
row's first real token sits at position 0 whatever its padding; every collate function returns
those ``position_ids``.

Labels (``collate_lm``) are aligned with ``input_ids``; the model shifts them (logits at ``t``
predict ``labels[t + 1]``). A label is ``IGNORE_INDEX`` (-100) on padding, outside the example's
targets (after its ``n_prompt`` prompt tokens, or inside its ``(start, end)`` reply spans), and always
on the first real token: under left padding the position before it is padding, so nothing real
predicts it (for pretraining text, pass ``n_prompt=0``: BOS is masked, every later token is a target).

Sequences longer than ``max_len`` raise :class:`trainers.errors.DataError` (an over-long prompt is
a data problem the user must fix; silently truncating would train on broken examples).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainers.errors import DataError

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss skips."""


def encode_text(tok, text: str) -> list[int]:
    """``BOS + text + EOS`` for pretraining documents (no BOS when the tokenizer has none, as Qwen's)."""
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    return [*bos, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]


def text_windows(tok, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """``BOS + text + EOS`` of each text cut into consecutive windows of at most ``max_len`` tokens, in order.

    Pretraining text has no natural unit, so a long document is several examples (not a data error);
    a lone-token window has nothing to predict and is dropped. The pretrain stage, PPO-ptx and the
    pretraining-loss evaluation all cut text this way.
    """
    pieces = []
    for text in texts:
        ids = encode_text(tok, text)
        pieces += [
            ids[i : i + max_len] for i in range(0, len(ids), max_len) if len(ids[i : i + max_len]) >= 2
        ]
    return pieces


def check_lengths(lengths: Sequence[int], max_len: int | None, what: str = "example") -> None:
    """Raise DataError naming the first sequence longer than ``max_len`` (None: no limit)."""
    if max_len is None:
        return
    for i, n in enumerate(lengths):
        if n > max_len:
            raise DataError(
                f"{what} {i} is {n} tokens long, more than max_len={max_len}; shorten it or raise the limit"
            )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: position 0 at each row's first real token (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T) with T the longest sequence, padding on the left."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(seqs):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def target_spans(n_ids: int, targets: int | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open target ranges of an example: ``n_prompt`` (an int: everything after the prompt) or the
    ``(start, end)`` spans themselves; the first token is never a target."""
    spans = [(targets, n_ids)] if isinstance(targets, int) else list(targets)
    return [(max(start, 1), end) for start, end in spans if end > max(start, 1)]


def collate_lm(
    examples: Sequence[tuple[Sequence[int], int | Sequence[tuple[int, int]]]],
    pad_id: int,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch ``(ids, n_prompt or spans)`` examples for causal-LM training (SFT: conversation; ptx: text).

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``, all (B, T); labels
    are ``IGNORE_INDEX`` on padding, outside the targets (:func:`target_spans`) and on the first real
    token.
    """
    check_lengths([len(ids) for ids, _ in examples], max_len)
    input_ids, attention_mask = left_pad([ids for ids, _ in examples], pad_id)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    width = input_ids.shape[1]
    for row, (ids, targets) in enumerate(examples):
        offset = width - len(ids)
        for start, end in target_spans(len(ids), targets):
            labels[row, offset + start : offset + end] = input_ids[row, offset + start : offset + end]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "labels": labels,
    }


def collate_rm(
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]],
    pad_id: int,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch ranked groups ``(prompt_ids, [response_ids] * K, ranking)`` for the reward model.

    All K responses of a prompt are rows of the same batch element (one forward each, docs/ppo_details.md
    item 8). Output: ``input_ids``, ``attention_mask``, ``position_ids`` (N * Kmax, T), row
    ``n * Kmax + k`` = prompt n + response k, left-padded so the last column is every row's last
    real token; ``ranks`` (N, Kmax) with -1 for absent slots, whose rows repeat the group's first
    sequence so that no row is all padding.
    """
    k_max = max(len(responses) for _, responses, _ in groups)
    rows: list[list[int]] = []
    ranks = torch.full((len(groups), k_max), -1, dtype=torch.long)  # (N, Kmax)
    for n, (prompt_ids, responses, ranking) in enumerate(groups):
        if len(ranking) != len(responses) or not responses:
            raise DataError(f"comparison {n}: {len(responses)} responses but {len(ranking)} ranks")
        seqs = [[*prompt_ids, *response] for response in responses]
        rows += seqs + [seqs[0]] * (k_max - len(seqs))
        ranks[n, : len(ranking)] = torch.tensor(list(ranking), dtype=torch.long)
    check_lengths([len(r) for r in rows], max_len, what="comparison row")
    input_ids, attention_mask = left_pad(rows, pad_id)  # (N * Kmax, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "ranks": ranks,
    }


def collate_prompts(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``input_ids``, ``attention_mask``, ``position_ids`` (B, T)."""
    check_lengths([len(p) for p in prompt_ids], max_len, what="prompt")
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }
