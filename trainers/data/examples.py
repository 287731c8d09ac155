"""Token-level examples of each data kind, in the model's chat format, with the over-long policy applied.

Records come normalised to conversations (:mod:`trainers.data`: ``messages`` lists); a
:class:`~trainers.data.chat.ChatFormat` turns them into ids; what does not fit ``model.max_len`` follows
``data.overlong``:

- ``drop`` (default): the example is left out and counted. A user with a 100k-row dataset expects a few
  long rows not to stop the run, and to be told how many went (one line per kind and split, and
  ``data/overlong`` in the stage's ``summary.json``).
- ``truncate``: the prompt loses tokens from the left (after a leading BOS, which stays) until the
  example fits; the reply and its end-of-turn token are never cut. An example whose reply alone does not
  fit is dropped and counted.
- ``error``: every over-long row is a ``PATH:RECORD: ...`` line and the run does not start.

A record the template cannot render (:class:`~trainers.data.chat.ChatError`) is always a ``PATH:RECORD:``
problem. RECORD is the record's 1-based position in the file (the row for Parquet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trainers.data.chat import ChatError, ChatFormat
from trainers.data.validate import MAX_PROBLEMS, raise_if_problems

OVERLONG = ("drop", "truncate", "error")

log = logging.getLogger(__name__)


@dataclass
class Overlong:
    """What the over-long policy did to one file (a kind and split)."""

    where: str
    """The file (or ``kind/split``) the rows came from."""
    rows: int = 0
    dropped: int = 0
    truncated: int = 0

    def line(self, limit: str) -> str | None:
        """``WHERE: N of M rows longer than LIMIT dropped, K truncated``; None when none were."""
        if not (self.dropped or self.truncated):
            return None
        return (
            f"{self.where}: {self.dropped} of {self.rows} rows longer than {limit} "
            f"dropped, {self.truncated} truncated (data.overlong)"
        )

    def as_dict(self) -> dict:
        return {"rows": self.rows, "dropped": self.dropped, "truncated": self.truncated}


class _Collector:
    """Problem lines of one file (at most :data:`MAX_PROBLEMS`, then a count), raised together."""

    def __init__(self, where: str):
        self.where, self.lines, self.more = where, [], 0

    def add(self, index: int, message: str) -> None:
        if len(self.lines) < MAX_PROBLEMS:
            self.lines.append(f"{self.where}:{index + 1}: {message}")
        else:
            self.more += 1

    def raise_if_any(self) -> None:
        raise_if_problems(self.lines + ([f"... and {self.more} more problems"] if self.more else []))


def where_of(paths: Sequence, kind: str, split: str) -> str:
    """The name problem lines and over-long counts use: the one file, or ``kind/split`` for several."""
    return str(paths[0]) if len(paths) == 1 else f"{kind}/{split}"


def _fit_prompt(prompt: list[int], budget: int, keep_first: bool) -> list[int] | None:
    """``prompt`` cut from the left to at most ``budget`` tokens (keeping a leading BOS); None if even
    that leaves no prompt token."""
    if len(prompt) <= budget:
        return prompt
    head = prompt[:1] if keep_first else []
    room = budget - len(head)
    if room < 1:
        return None
    return head + prompt[len(prompt) - room :]


def _apply(
    where: str,
    items: Sequence,
    encode: Callable,
    length: Callable,
    shrink: Callable,
    limit: int,
    policy: str,
    what: str,
    limit_text: str,
) -> tuple[list, list[int], Overlong]:
    """Encode every item; keep, truncate, drop or report the over-long ones. Returns ``(examples, kept
    indices, counts)``."""
    if policy not in OVERLONG:
        raise ValueError(f"unknown over-long policy {policy!r}")
    problems, counts = _Collector(where), Overlong(where, rows=len(items))
    examples, kept = [], []
    for index, item in enumerate(items):
        try:
            example = encode(item)
        except ChatError as err:
            problems.add(index, str(err))
            continue
        n = length(example)
        if n > limit:
            if policy == "error":
                problems.add(index, f"{what} is {n} tokens long, more than {limit_text}")
                continue
            example = shrink(example) if policy == "truncate" else None
            if example is None:
                counts.dropped += 1
                continue
            counts.truncated += 1
        examples.append(example)
        kept.append(index)
    problems.raise_if_any()
    return examples, kept, counts


def _bos_first(fmt: ChatFormat, ids: Sequence[int]) -> bool:
    bos = fmt.tokenizer.bos_token_id
    return bos is not None and len(ids) > 0 and ids[0] == bos


def demonstration_examples(
    fmt: ChatFormat,
    records: Sequence[dict],
    where: str,
    max_len: int,
    policy: str = "drop",
    all_turns: bool = False,
) -> tuple[list[tuple[list[int], int | list[tuple[int, int]]]], Overlong]:
    """``(ids, targets)`` per demonstration and the counts: ``targets`` is the number of prompt tokens
    when only the final reply is trained on (the reply is the rest), else the ``(start, end)`` reply
    spans (:meth:`ChatFormat.conversation_ids`); :func:`trainers.data.collate.collate_lm` takes both.

    Truncation keeps the final reply whole and shifts the spans; spans of earlier replies that lose
    tokens are clipped (or vanish).
    """

    def encode(record):
        return fmt.conversation_ids(record["messages"], all_turns=all_turns)

    def shrink(example):
        ids, spans = example
        cut = len(ids) - max_len
        first = 1 if _bos_first(fmt, ids) else 0
        if spans[-1][0] - first < cut:  # the prompt of the final reply is shorter than the excess
            return None
        ids = ids[:first] + ids[first + cut :]
        shifted = [(max(s - cut, first), e - cut) for s, e in spans if e - cut > first]
        return ids, shifted

    examples, _, counts = _apply(
        where,
        records,
        encode,
        lambda ex: len(ex[0]),
        shrink,
        max_len,
        policy,
        "prompt + response",
        f"model.max_len={max_len}",
    )
    return [_as_prompt_length(ids, spans) for ids, spans in examples], counts


def _as_prompt_length(ids: list[int], spans: list[tuple[int, int]]) -> tuple[list[int], object]:
    """``(ids, n_prompt)`` when the only target is the reply at the end, else ``(ids, spans)``."""
    if len(spans) == 1 and spans[0][1] == len(ids):
        return ids, spans[0][0]
    return ids, spans


def comparison_examples(
    fmt: ChatFormat, records: Sequence[dict], where: str, max_len: int, policy: str = "drop"
) -> tuple[list[tuple[list[int], list[list[int]], list[int]]], Overlong]:
    """``(prompt ids, [response ids] * K, ranking)`` per comparison and the counts; the length of a
    group is its prompt plus its longest response."""

    def encode(record):
        prompt, responses = fmt.replies_ids(record["messages"], record["responses"])
        return prompt, responses, list(record["ranking"])

    def shrink(group):
        prompt, responses, ranking = group
        budget = max_len - max(len(r) for r in responses)
        cut = _fit_prompt(prompt, budget, _bos_first(fmt, prompt))
        return None if cut is None else (cut, responses, ranking)

    def length(group):
        return len(group[0]) + max(len(r) for r in group[1])

    examples, _, counts = _apply(
        where,
        records,
        encode,
        length,
        shrink,
        max_len,
        policy,
        "prompt + longest response",
        f"model.max_len={max_len}",
    )
    return examples, counts


def prompt_examples(
    fmt: ChatFormat,
    records: Sequence[dict],
    where: str,
    room: int,
    policy: str = "drop",
    room_text: str | None = None,
) -> tuple[list[list[int]], list[int], Overlong]:
    """Prompt ids (the conversation + generation prompt) of at most ``room`` tokens, the indices of the
    records kept, and the counts (PPO: ``room`` = ``model.max_len - rollout.max_new_tokens``, which
    ``room_text`` says in error lines)."""

    def shrink(prompt):
        return _fit_prompt(prompt, room, _bos_first(fmt, prompt))

    return _apply(
        where,
        records,
        lambda r: fmt.prompt_ids(r["messages"]),
        len,
        shrink,
        room,
        policy,
        "prompt",
        room_text or f"{room} tokens",
    )


def report_overlong(counts: Sequence[Overlong], limit: str) -> dict:
    """Print one line per file that lost or cut rows (``limit`` says the bound, e.g. ``model.max_len=256``);
    ``{where: counts}`` of those for ``summary.json``."""
    out = {}
    for c in counts:
        line = c.line(limit)
        if line is not None:
            print(f"data: {line}", flush=True)
            out[c.where] = c.as_dict()
    return out
