"""Rollout batches: prompt and response token ids laid out as the model passes read them.

Row i is prompt i left-padded to P, then response i (cut after its first EOS) right-padded to R
(PPO_DETAILS 1, 4). Pure: torch only, no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """Response tokens up to and including the first EOS (PPO_DETAILS 4); unchanged if there is none."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def build_rollout_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
    vllm_logprobs: Sequence[Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Token tensors of one rollout: row i is prompt i left-padded to P, then response i (cut after its
    first EOS) right-padded to R (PPO_DETAILS 1, 4).

    Returns ``sequences (N, P+R)``, ``attention_mask (N, P+R)``, ``response_mask (N, R)`` (1 on response
    tokens up to and including EOS) and, if given, ``vllm_logprobs (N, R)`` (0 on padding). PAD must not
    be EOS (item 2): masks come from lengths here, but every model pass downstream trusts them.
    """
    if pad_id == eos_id:
        raise ValueError("PAD and EOS must be different tokens (PPO_DETAILS 2)")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    cut = [cut_at_eos(r, eos_id) for r in responses]
    n, p_len = len(prompts), max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in cut))  # at least one column so shapes stay valid
    sequences = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)  # (N, P+R)
    attention_mask = torch.zeros((n, p_len + r_len), dtype=torch.long)  # (N, P+R)
    for i, (prompt, response) in enumerate(zip(prompts, cut)):
        sequences[i, p_len - len(prompt) : p_len] = torch.tensor(prompt, dtype=torch.long)
        sequences[i, p_len : p_len + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, p_len - len(prompt) : p_len + len(response)] = 1
    batch = {
        "sequences": sequences,
        "attention_mask": attention_mask,
        "response_mask": attention_mask[:, p_len:].clone(),  # (N, R)
    }
    if vllm_logprobs is not None:
        lp = torch.zeros((n, r_len), dtype=torch.float32)  # (N, R)
        for i, (values, response) in enumerate(zip(vllm_logprobs, cut)):
            lp[i, : len(response)] = torch.tensor(list(values)[: len(response)], dtype=torch.float32)
        batch["vllm_logprobs"] = lp
    return batch


def select_rows(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of every tensor in ``batch`` (all share dimension 0)."""
    return {k: v.index_select(0, idx) for k, v in batch.items()}
