"""The one record shape the stages consume: conversations, whatever format a file was written in.

:func:`read_conversations` reads and validates files like :func:`~trainers.data.validate.read_records`
and turns every record into its kind's canonical shape (messages are exactly ``{"role", "content"}``;
the optional fields ``user_id``, ``task``, ``options``, ``answer`` follow when present)::

    demonstrations  {"messages": [..., {"role": "assistant", ...}]}     prompt/response -> [user, assistant]
    comparisons     {"messages": [prompt turns, ending with a user turn],
                     "responses": [K assistant texts], "ranking": [K ints]}
                                                                        chosen/rejected -> responses
                                                                        [chosen, rejected], ranking [0, 1]
    prompts         {"messages": [..., {"role": "user", ...}], "prompt": the file's prompt value (a
                     string or messages) or, for a messages file, the last user turn's text,
                     **extra fields as the file has them}
    pretrain        {"text": ...}

A string prompt is one user turn. The texts of ``chosen``/``rejected`` given as message lists are their
final assistant turn (the turns before it, if any, were checked to equal the prompt's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from trainers.data.schema import (
    KEEPS_EXTRA,
    OPTIONAL,
    Format,
    known_fields,
    prompt_messages,
    reply_text,
)
from trainers.data.validate import MAX_PROBLEMS, read_formatted


def _main_fields(kind: str, fmt: Format, record: dict) -> dict:
    """The canonical fields of a valid, clean record of ``kind`` in ``fmt`` (optional fields aside)."""
    if kind == "pretrain":
        return {"text": record["text"]}
    if kind == "demonstrations":
        if fmt.name == "messages":
            return {"messages": record["messages"]}
        return {
            "messages": prompt_messages(record["prompt"])
            + [{"role": "assistant", "content": record["response"]}]
        }
    if kind == "comparisons":
        messages = prompt_messages(record["prompt"])
        if fmt.name == "chosen/rejected":
            texts = [reply_text(record[name], record["prompt"])[0] for name in ("chosen", "rejected")]
            return {"messages": messages, "responses": texts, "ranking": [0, 1]}
        return {"messages": messages, "responses": record["responses"], "ranking": record["ranking"]}
    if fmt.name == "messages":
        messages = record["messages"]
        return {"messages": messages, "prompt": messages[-1]["content"]}
    return {"messages": prompt_messages(record["prompt"]), "prompt": record["prompt"]}


def to_conversation(kind: str, fmt: Format, record: dict) -> dict:
    """A valid, clean record (as :func:`~trainers.data.schema.clean_record` returns it) of ``kind`` in
    ``fmt``, in the canonical shape above."""
    out = _main_fields(kind, fmt, record)
    out.update((name, record[name]) for name in OPTIONAL if name in record)
    if kind in KEEPS_EXTRA:
        known = set(known_fields(kind, fmt))
        out.update((name, value) for name, value in record.items() if name not in known)
    return out


def read_conversations(
    kind: str, paths: Sequence[str | os.PathLike], *, max_problems: int = MAX_PROBLEMS
) -> list[dict]:
    """Read and validate data files of ``kind`` (any format, see :mod:`trainers.data.schema`); every
    record in the canonical shape, in file order. Raises :class:`~trainers.errors.DataError` with the
    problem lines, like :func:`~trainers.data.validate.read_records`."""
    return [
        to_conversation(kind, fmt, r) for fmt, r in read_formatted(kind, paths, max_problems=max_problems)
    ]
