"""The data that crosses between the driver and the actors, typed: token batches, rollouts, experience.

Shapes: N rows (sequences), P prompt columns, R response columns, L = P + R. Row i is prompt i left-padded to
P, then response i (cut after its first stop id) right-padded to R (docs/ppo_details.md item 1, 4, 28);
response token t sits at column ``P + t``. Every tensor is on the CPU when it crosses Ray (dataclasses of
tensors pickle as they are). Masks come from lengths, never from comparing ids with PAD, so PAD may equal a
stop id (docs/ppo_details.md item 2).

Pure: torch only, no Ray, DeepSpeed or vLLM, so the actors import these types without the driver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _rows(value: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return value.index_select(0, idx)


class _Rows:
    """Row selection shared by the batch types: every tensor field has the rows as dimension 0."""

    def _map(self, fn):
        changes = {
            f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor | _Rows) else v
            for f in dataclasses.fields(self)
        }
        return dataclasses.replace(self, **changes)

    def rows(self, idx: torch.Tensor):
        """The rows ``idx`` (a ``(k,)`` index tensor) of every tensor."""
        return self._map(lambda v: v.rows(idx) if isinstance(v, _Rows) else _rows(v, idx))

    def row_range(self, start: int, stop: int):
        """The consecutive rows ``start .. stop - 1`` of every tensor (views, no copy)."""
        return self._map(lambda v: v.row_range(start, stop) if isinstance(v, _Rows) else v[start:stop])

    def to(self, device: torch.device | str):
        """Every tensor on ``device``."""
        return self._map(lambda v: v.to(device))

    def micro_batches(self, size: int) -> list:
        """Consecutive pieces of at most ``size`` rows."""
        if size < 1:
            raise ValueError(f"micro-batch size must be positive, got {size}")
        return [self.row_range(start, start + size) for start in range(0, len(self), size)]


@dataclass
class TokenBatch(_Rows):
    """Token ids of N sequences and their masks: what every no-grad pass (log-probs, scores, values) reads."""

    sequences: torch.Tensor
    """``(N, P+R)`` long: left-padded prompt ++ right-padded response."""
    attention_mask: torch.Tensor
    """``(N, P+R)`` long: 1 on every real token of prompt and response."""
    response_mask: torch.Tensor
    """``(N, R)`` long: 1 on the response tokens up to and including the first stop id."""

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_len(self) -> int:
        """R, the number of response columns."""
        return self.response_mask.shape[1]

    def responses(self) -> torch.Tensor:
        """``(N, R)`` the response columns of ``sequences``."""
        return self.sequences[:, -self.response_len :]

    def row_lengths(self) -> list[tuple[int, int]]:
        """``(prompt, response)`` real tokens of each row: the segment lengths of
        ``trainers.data.packing``."""
        r_len = self.response_len
        prompts = self.attention_mask[:, :-r_len].sum(-1).tolist()  # (N,)
        responses = self.response_mask.sum(-1).tolist()  # (N,)
        return list(zip(prompts, responses))

    def trimmed(self) -> TokenBatch:
        """The same rows without their all-padding columns: the prompt columns left of the longest prompt
        and the response columns right of the longest response (at least one). Response token t stays at
        column ``P' + t``, and positions come from the attention mask, so every real token's output is
        unchanged (docs/design.md, "Token-budget micro-batches (issue 17)")."""
        r_len = self.response_len
        p_keep = int(self.attention_mask[:, :-r_len].sum(-1).max())
        r_keep = max(1, int(self.response_mask.sum(-1).max()))
        start, stop = self.sequences.shape[1] - r_len - p_keep, self.sequences.shape[1] - r_len + r_keep
        return TokenBatch(
            self.sequences[:, start:stop], self.attention_mask[:, start:stop], self.response_mask[:, :r_keep]
        )


@dataclass
class Rollout(_Rows):
    """One iteration's samples as the driver holds them (:func:`build_rollout_batch`)."""

    tokens: TokenBatch
    """Prompts and responses, ``(N, P+R)``."""
    vllm_logprobs: torch.Tensor | None = None
    """``(N, R)`` float32: vLLM's log-probs of the sampled tokens, 0 on padding (a mismatch metric only,
    docs/ppo_details.md item 5); None when not asked for."""
    truncated: torch.Tensor | None = None
    """``(N,)`` bool: the response reached the length limit without a stop id (vLLM's finish reason
    ``'length'``; docs/ppo_details.md item 29); None when the finish reasons were not given."""

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Experience(_Rows):
    """What the training actors learn from (one ``ray.put`` per iteration, both roles read it).

    The policy reads ``old_logprobs``, ``advantages`` and (KL as a loss term) ``ref_logprobs``, the critic
    ``values`` and ``returns``; all are ``(N, R)`` float32 and 0 on padding.
    """

    tokens: TokenBatch
    """Prompts and responses, ``(N, P+R)``."""
    old_logprobs: torch.Tensor
    """``(N, R)`` log-probs of the policy's trained model at rollout time (docs/ppo_details.md item 5)."""
    advantages: torch.Tensor
    """``(N, R)`` the estimator's advantages (``ppo.advantage``; GAE's whitened over the batch,
    docs/ppo_details.md item 17, 31)."""
    values: torch.Tensor | None = None
    """``(N, R)`` the critic's values at rollout time (the centre of the value clip); None without a critic."""
    returns: torch.Tensor | None = None
    """``(N, R)`` advantages (before whitening) + values: the critic's targets (docs/ppo_details.md item
    16); None without a critic."""
    ref_logprobs: torch.Tensor | None = None
    """``(N, R)`` the reference's log-probs, sent only when ``ppo.kl_loss_coef > 0`` (the KL loss term)."""

    def __len__(self) -> int:
        return len(self.tokens)

    def trimmed(self) -> Experience:
        """The same rows with the tokens :meth:`TokenBatch.trimmed` and every ``(N, R)`` tensor cut to
        the kept response columns (the cut ones are padding, 0 in each)."""
        tokens = self.tokens.trimmed()
        r_keep = tokens.response_len
        changes = {
            f.name: v[:, :r_keep]
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, tokens=tokens, **changes)


@dataclass
class PtxBatch(_Rows):
    """One pretraining micro-batch of the ptx term (docs/ppo_details.md item 20), left-padded, ``(b, T)``
    each."""

    input_ids: torch.Tensor
    """``(b, T)`` long."""
    attention_mask: torch.Tensor
    """``(b, T)`` long."""
    labels: torch.Tensor
    """``(b, T)`` long: the token to predict, -100 on padding and on each row's first token."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Response tokens up to and including the first of any stop id (docs/ppo_details.md item 4, 28);
    unchanged if there is none."""
    tokens, stops = list(tokens), set(stop_ids)
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens if end is None else tokens[: end + 1]


def build_rollout_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    stop_ids: Sequence[int],
    vllm_logprobs: Sequence[Sequence[float]] | None = None,
    finish_reasons: Sequence[str | None] | None = None,
) -> Rollout:
    """The :class:`Rollout` of these prompts and responses: each response cut after its first stop id,
    masks from the lengths, vLLM's log-probs (if given) aligned with the cut responses, and -- from
    vLLM's ``finish_reasons`` (if given) -- which responses were truncated: finish reason ``'length'``
    and no stop id (docs/ppo_details.md item 29).

    ``pad_id`` only fills the padding, which every mask excludes, so it may be a stop id too
    (docs/ppo_details.md item 2).
    """
    if not stop_ids:
        raise ValueError("no stop ids: a response could never end (docs/ppo_details.md item 28)")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if finish_reasons is not None and len(finish_reasons) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(finish_reasons)} finish reasons")
    cut = [cut_at_stop(r, stop_ids) for r in responses]
    n, p_len = len(prompts), max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in cut))  # at least one column so shapes stay valid
    sequences = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)  # (N, P+R)
    attention_mask = torch.zeros((n, p_len + r_len), dtype=torch.long)  # (N, P+R)
    for i, (prompt, response) in enumerate(zip(prompts, cut)):
        sequences[i, p_len - len(prompt) : p_len] = torch.tensor(prompt, dtype=torch.long)
        sequences[i, p_len : p_len + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, p_len - len(prompt) : p_len + len(response)] = 1
    tokens = TokenBatch(sequences, attention_mask, attention_mask[:, p_len:].clone())  # mask (N, R)
    lp = None
    if vllm_logprobs is not None:
        lp = torch.zeros((n, r_len), dtype=torch.float32)  # (N, R)
        for i, (values, response) in enumerate(zip(vllm_logprobs, cut)):
            lp[i, : len(response)] = torch.tensor(list(values)[: len(response)], dtype=torch.float32)
    truncated = None
    if finish_reasons is not None:
        stops = set(stop_ids)
        truncated = torch.tensor(
            [reason == "length" and not stops.intersection(r) for reason, r in zip(finish_reasons, cut)],
            dtype=torch.bool,
        )  # (N,)
    return Rollout(tokens, lp, truncated)
