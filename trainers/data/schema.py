"""Record schemas of the four data kinds, their file formats, and the per-record checks.

A *record* is one JSON object (JSONL) or one row (Parquet, Arrow) turned into a Python dict. Each kind
can be written in one or two *formats*, detected per file from the fields present (see
:func:`detect_format`); every kind also accepts the optional fields below. Checks return plain
messages (``"empty or whitespace-only string"``); :mod:`trainers.data.validate` adds the
``PATH:RECORD: field 'NAME':`` part.

| kind | format | fields | meaning |
|---|---|---|---|
| ``demonstrations`` | prompt/response | ``prompt: str``, ``response: str`` | a labeler-written answer (SFT) |
| | messages | ``messages``: a conversation ending with an assistant turn | multi-turn SFT |
| ``comparisons`` | responses/ranking | ``prompt``, ``responses: list[str]`` (K >= 2), ``ranking: list[int]`` (length K) | a ranking of K responses (RM); 0 = best, equal = tie, at least two distinct ranks |
| | chosen/rejected | ``prompt``, ``chosen``, ``rejected`` | a preferred and a dispreferred response (TRL's preference format) |
| ``prompts`` | prompt | ``prompt`` | a prompt for PPO rollouts / evaluation |
| | messages | ``messages``: a conversation ending with a user turn | a multi-turn prompt |
| ``pretrain`` | text | ``text: str`` | pretraining text (stage 0 and the ptx term) |

A *message* is exactly ``{"role": str, "content": str}`` with role ``system`` (first turn only),
``user`` or ``assistant`` and non-empty content (a key holding null is ignored: Arrow structs write
nulls for keys other rows have). ``prompt`` is a string in demonstrations; in comparisons and prompts
it may also be a list of messages ending with a user turn. ``chosen`` / ``rejected`` are strings, or
(as TRL writes them) lists holding the assistant turn, or whole conversations whose leading turns
equal the prompt's.

Optional on every kind: ``user_id`` (string or integer; the unit of the per-user cap and of the
train/valid/test split), ``task`` (string), and, written by the synthetic world on classification
and closed-QA rows, ``options`` (list of non-empty strings) and ``answer`` (string). A null optional
field counts as absent (Parquet writes nulls where some rows lack a column); a null required field is
a problem. Any other field is warned about and dropped, except on prompts, where *extra* fields are
kept as they are (a reward function may need them).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("demonstrations", "comparisons", "prompts", "pretrain")

ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""Message roles; ``system`` only as the first turn."""


@dataclass(frozen=True)
class Format:
    """One way of writing a kind's records. A file holds one format, told by its fields."""

    name: str
    """Shown in problem lines: ``prompt/response``, ``messages``, ``chosen/rejected``..."""
    required: tuple[str, ...]
    """Fields every record of this format has (output column order)."""
    signature: tuple[str, ...]
    """Fields that only this format of the kind has: any of them present selects it."""


FORMATS: dict[str, tuple[Format, ...]] = {
    "demonstrations": (
        Format("prompt/response", ("prompt", "response"), ("prompt", "response")),
        Format("messages", ("messages",), ("messages",)),
    ),
    "comparisons": (
        Format("responses/ranking", ("prompt", "responses", "ranking"), ("responses", "ranking")),
        Format("chosen/rejected", ("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    ),
    "prompts": (Format("prompt", ("prompt",), ("prompt",)), Format("messages", ("messages",), ("messages",))),
    "pretrain": (Format("text", ("text",), ("text",)),),
}
"""The formats of each kind; the first is the default (a record with no signature field is checked
against it) and is the only format before conversations were supported."""

REQUIRED: dict[str, tuple[str, ...]] = {kind: formats[0].required for kind, formats in FORMATS.items()}
"""Required fields of each kind's default format."""

OPTIONAL: tuple[str, ...] = ("user_id", "task", "options", "answer")

KEEPS_EXTRA: frozenset[str] = frozenset({"prompts"})
"""Kinds whose records keep fields the schema does not define (passed along to reward functions)."""


def default_format(kind: str) -> Format:
    """The format a record without any signature field is checked against."""
    return FORMATS[kind][0]


def format_named(kind: str, name: str) -> Format:
    """The format of ``kind`` called ``name`` (KeyError for an unknown name: a programming error)."""
    for fmt in FORMATS[kind]:
        if fmt.name == name:
            return fmt
    raise KeyError(f"{kind} has no format {name!r}")


def known_fields(kind: str, fmt: Format | None = None) -> tuple[str, ...]:
    """Fields a record of ``kind`` in ``fmt`` (default: the kind's default format) may carry: required
    first, then optional (output column order)."""
    return (fmt or default_format(kind)).required + OPTIONAL


def all_fields(kind: str) -> tuple[str, ...]:
    """Every field any format of ``kind`` defines, plus the optional ones (no duplicates)."""
    names = [name for fmt in FORMATS[kind] for name in fmt.required] + list(OPTIONAL)
    return tuple(dict.fromkeys(names))


def detect_format(kind: str, names: Collection[str]) -> tuple[Format, bool, tuple[str, str] | None]:
    """The format that the field ``names`` (of a record: its non-null keys; of a Parquet file: its
    columns) select: ``(format, selected, problem)``.

    ``selected`` is False when no signature field is present (the default format is returned, so a
    record missing everything gets the default's "missing" lines). ``problem`` is a ``(field,
    message)`` pair when the names hold signature fields of two formats (one record is in one format).
    """
    hits = [fmt for fmt in FORMATS[kind] if any(name in names for name in fmt.signature)]
    if not hits:
        return default_format(kind), False, None
    if len(hits) > 1:
        first, second = hits[0], hits[1]
        mine = next(n for n in second.signature if n in names)
        theirs = next(n for n in first.signature if n in names)
        message = f"given together with '{theirs}'; a record is in one format: {first.name} or {second.name}"
        return first, True, (mine, message)
    return hits[0], True, None


def key_field(kind: str) -> str:
    """The text field that identifies a record for deduplication: ``text`` for pretrain, else ``prompt``
    (default formats; :func:`key_text` covers every format)."""
    return "text" if kind == "pretrain" else "prompt"


def key_text(kind: str, record: dict) -> str:
    """The text that identifies a valid record for deduplication (InstructGPT dedups by prompt).

    ``text`` for pretrain; a string ``prompt`` as it is; a conversation's prompt turns (all turns of a
    prompts conversation, all but the final assistant turn of a demonstration) without system turns
    (a system prompt shared by every row must not make them all duplicates), joined by newlines.
    """
    if kind == "pretrain":
        return record["text"]
    if "messages" in record:
        turns = record["messages"][:-1] if kind == "demonstrations" else record["messages"]
    elif isinstance(record["prompt"], str):
        return record["prompt"]
    else:
        turns = record["prompt"]
    return "\n".join(m["content"] for m in turns if m["role"] != "system")


def json_type_name(value: object) -> str:
    """The JSON name of a Python value's type, as users see it in their files (``integer``, ``list``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "boolean"
    names = {int: "integer", float: "number", str: "string", list: "list", dict: "object"}
    for py_type, name in names.items():
        if isinstance(value, py_type):
            return name
    return type(value).__name__


def is_integer(value: object) -> bool:
    """True for a real integer (JSON ``true`` parses to a bool, which is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_text(value: object) -> str | None:
    """A non-empty string with at least one non-whitespace character."""
    if not isinstance(value, str):
        return f"expected a string, got {json_type_name(value)}"
    if not value.strip():
        return "empty or whitespace-only string"
    return None


def check_any_string(value: object) -> str | None:
    """Any string, empty allowed (``answer``: the gold answer may legitimately be short or empty)."""
    if not isinstance(value, str):
        return f"expected a string, got {json_type_name(value)}"
    return None


def _check_text_list(value: object, item: str, min_items: int) -> str | None:
    """A list of at least ``min_items`` non-empty strings; ``item`` names an element in messages."""
    if not isinstance(value, list):
        return f"expected a list of strings, got {json_type_name(value)}"
    if len(value) < min_items:
        return f"needs at least {min_items} {item}{'s' if min_items > 1 else ''}, got {len(value)}"
    for i, element in enumerate(value, start=1):
        if element is None:
            return f"{item} {i} is null"
        if not isinstance(element, str):
            return f"{item} {i} is {json_type_name(element)}, expected a string"
        if not element.strip():
            return f"{item} {i} is an empty or whitespace-only string"
    return None


def check_responses(value: object) -> str | None:
    """The K >= 2 candidate responses of a comparison, each a non-empty string."""
    return _check_text_list(value, "response", 2)


def check_options(value: object) -> str | None:
    """The answer options of a classification prompt: at least one non-empty string."""
    return _check_text_list(value, "option", 1)


def check_ranking(value: object) -> str | None:
    """Ranks of the K responses: non-negative integers (0 = best, equal = tie).

    That the ranks match the responses and hold two distinct values is checked against the responses
    (:func:`check_ranking_against`), so a record with K = 1 gets one problem, not two.
    """
    if not isinstance(value, list):
        return f"expected a list of integers, got {json_type_name(value)}"
    for i, rank in enumerate(value, start=1):
        if not is_integer(rank):
            return f"ranking not integers (item {i} is {json_type_name(rank)} {rank!r})"
    for i, rank in enumerate(value, start=1):
        if rank < 0:
            return f"negative rank {rank} (item {i}); 0 is the best rank"
    return None


def check_ranking_against(responses: list, ranking: list) -> str | None:
    """A ranking (valid on its own) against valid responses: one rank per response, two distinct ranks.

    A ranking whose ranks are all equal carries no preference, so no RM pair can be formed from it.
    """
    if len(ranking) != len(responses):
        return f"length {len(ranking)} does not match the {len(responses)} responses"
    if len(set(ranking)) < 2:
        return f"no two distinct ranks ({ranking!r}); a ranking must prefer at least one response"
    return None


def check_user_id(value: object) -> str | None:
    """A labeler/customer id: a non-empty string or an integer."""
    if is_integer(value):
        return None
    if isinstance(value, str):
        return None if value.strip() else "empty or whitespace-only string"
    return f"expected a string or integer, got {json_type_name(value)}"


# ----------------------------------------------------------------------------------------------------
# Messages (conversations)


def _check_message(message: object, i: int) -> str | None:
    """One message of a list (``i`` is its 1-based position): ``{role, content}`` strings, a known role,
    non-empty content; other keys only when null."""
    if not isinstance(message, dict):
        return f"message {i} is {json_type_name(message)}, expected an object with 'role' and 'content'"
    for key in ("role", "content"):
        if message.get(key) is None:
            return f"message {i} has no '{key}'"
        if not isinstance(message[key], str):
            return f"message {i}: '{key}' is {json_type_name(message[key])}, expected a string"
    extra = [key for key, value in message.items() if key not in ("role", "content") and value is not None]
    if extra:
        return f"message {i} has unknown key '{extra[0]}'; a message is {{role, content}}"
    if message["role"] not in ROLES:
        return f"message {i} has unknown role {message['role']!r}; roles are {', '.join(ROLES)}"
    if not message["content"].strip():
        return f"message {i} ({message['role']}) has empty or whitespace-only content"
    return None


def _a(role: str) -> str:
    """``a user``, ``an assistant``: the role with its article."""
    return f"{'an' if role == 'assistant' else 'a'} {role}"


def check_messages(value: object, last: str, need_user: bool = True) -> str | None:
    """A conversation: a non-empty list of valid messages, ``system`` only first, ending with a ``last``
    turn (``assistant`` for a demonstration or a reply, ``user`` for a prompt); with ``need_user``, a
    user turn must come before a final assistant turn (else the prompt would be empty)."""
    if not isinstance(value, list):
        return f"expected a list of messages, got {json_type_name(value)}"
    if not value:
        return "empty list; expected at least one message"
    for i, message in enumerate(value, start=1):
        if (msg := _check_message(message, i)) is not None:
            return msg
        if message["role"] == "system" and i > 1:
            return f"message {i} has role 'system'; a system turn may only come first"
    if value[-1]["role"] != last:
        return f"ends with {_a(value[-1]['role'])} turn; it must end with {_a(last)} turn"
    if last == "assistant" and need_user and not any(m["role"] == "user" for m in value[:-1]):
        return "no user turn before the final assistant turn"
    return None


def normalise_messages(messages: list) -> list[dict]:
    """Valid messages as exactly ``{"role", "content"}`` dicts, in that key order (null keys dropped)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_messages(prompt: str | list) -> list[dict]:
    """A valid ``prompt`` as a conversation: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else normalise_messages(prompt)


def check_conversation_prompt(value: object) -> str | None:
    """A prompt of a comparison or a prompts record: a non-empty string or messages ending with a user
    turn. A value that is neither keeps the plain string wording (``expected a string, got integer``)."""
    return check_messages(value, last="user") if isinstance(value, list) else check_text(value)


def check_reply(value: object) -> str | None:
    """``chosen`` / ``rejected``: a non-empty string, or messages ending with the assistant turn (the
    turns before it, if any, are compared with the prompt by :func:`check_pair`)."""
    if isinstance(value, list):
        return check_messages(value, last="assistant", need_user=False)
    return check_text(value)


def reply_text(reply: str | list, prompt: str | list) -> tuple[str | None, str | None]:
    """The assistant text of a valid ``chosen`` / ``rejected``: ``(text, None)``, or ``(None, problem)``
    when a whole conversation's leading turns are not the prompt's."""
    if isinstance(reply, str):
        return reply, None
    head = normalise_messages(reply[:-1])
    if head and head != prompt_messages(prompt):
        return None, (
            f"its first {len(head)} turns do not match 'prompt'; give the assistant turn alone "
            "or the whole conversation starting with the prompt's turns"
        )
    return reply[-1]["content"], None


def check_pair(record: dict) -> list[tuple[str, str]]:
    """Problems of a chosen/rejected record whose fields are individually valid: prompt prefixes that
    do not match, and a ``rejected`` equal to ``chosen`` (no preference to learn from)."""
    problems, texts = [], {}
    for name in ("chosen", "rejected"):
        texts[name], problem = reply_text(record[name], record["prompt"])
        if problem is not None:
            problems.append((name, problem))
    if not problems and texts["chosen"].strip() == texts["rejected"].strip():
        problems.append(("rejected", "same text as 'chosen'; a comparison needs two different responses"))
    return problems


# ----------------------------------------------------------------------------------------------------
# Records


CHECKS: dict[str, Callable[[object], str | None]] = {
    "prompt": check_text,
    "response": check_text,
    "text": check_text,
    "task": check_text,
    "responses": check_responses,
    "ranking": check_ranking,
    "user_id": check_user_id,
    "options": check_options,
    "answer": check_any_string,
    "chosen": check_reply,
    "rejected": check_reply,
}
"""The check of each field, where it does not depend on the kind (see :func:`field_check`)."""

_KIND_CHECKS: dict[tuple[str, str], Callable[[object], str | None]] = {
    ("demonstrations", "messages"): lambda v: check_messages(v, last="assistant"),
    ("prompts", "messages"): lambda v: check_messages(v, last="user"),
    ("comparisons", "prompt"): check_conversation_prompt,
    ("prompts", "prompt"): check_conversation_prompt,
}


def field_check(kind: str, name: str) -> Callable[[object], str | None]:
    """The check of field ``name`` in a record of ``kind``."""
    return _KIND_CHECKS.get((kind, name)) or CHECKS[name]


def record_format(kind: str, record: dict) -> tuple[Format, bool, tuple[str, str] | None]:
    """:func:`detect_format` on a record's non-null fields."""
    return detect_format(kind, [name for name, value in record.items() if value is not None])


def check_record(
    kind: str, record: dict, skip: frozenset[str] = frozenset(), fmt: Format | None = None
) -> list[tuple[str, str]]:
    """Problems of one record as ``(field, message)`` pairs, in field order; empty when valid.

    ``fmt`` is the format to check against (default: the one the record's fields select; a record
    with fields of two formats gets that one problem). ``skip`` names fields already reported for the
    whole file (a Parquet column of the wrong type), so they are not reported again on every row.
    Unknown fields are not problems (see :func:`unknown_fields`).
    """
    if fmt is None:
        fmt, _, problem = record_format(kind, record)
        if problem is not None:
            return [problem]
    problems: list[tuple[str, str]] = []
    for name in fmt.required:
        if name in skip:
            continue
        if name not in record:
            problems.append((name, "missing"))
        elif record[name] is None:
            problems.append((name, "null value"))
        elif (msg := field_check(kind, name)(record[name])) is not None:
            problems.append((name, msg))
    for name in OPTIONAL:
        value = record.get(name)
        if name not in skip and value is not None and (msg := CHECKS[name](value)) is not None:
            problems.append((name, msg))
    # Cross-field checks, only once the fields involved are individually valid.
    involved = set(fmt.required) - {"prompt"} if fmt.name == "responses/ranking" else set(fmt.required)
    if kind == "comparisons" and not skip & involved and not involved & {name for name, _ in problems}:
        if fmt.name == "chosen/rejected":
            problems.extend(check_pair(record))
        elif (msg := check_ranking_against(record["responses"], record["ranking"])) is not None:
            problems.append(("ranking", msg))
    return problems


def unknown_fields(kind: str, record: dict, fmt: Format | None = None) -> list[str]:
    """Fields of ``record`` that ``kind`` in ``fmt`` does not define: warned about and ignored, or, for
    a kind in :data:`KEEPS_EXTRA`, warned about once and kept (see :func:`clean_record`)."""
    known, other = set(known_fields(kind, fmt)), set(all_fields(kind))
    # A null field of the kind's other format is an Arrow artefact (a column other rows fill), not data.
    return [
        name for name, value in record.items() if name not in known and not (value is None and name in other)
    ]


def clean_record(kind: str, record: dict, fmt: Format | None = None) -> dict:
    """A validated record reduced to its known fields, in schema order, absent optional fields dropped.

    Messages become exactly ``{role, content}``. Prompts keep their extra fields, after the known
    ones, as they are (null included: Parquet cannot tell a null from an absent value).
    """
    out = {}
    for name in known_fields(kind, fmt):
        value = record.get(name)
        if value is None:
            continue
        out[name] = (
            normalise_messages(value) if name in _MESSAGE_FIELDS and isinstance(value, list) else value
        )
    if kind in KEEPS_EXTRA:
        out.update((name, record[name]) for name in unknown_fields(kind, record, fmt))
    return out


_MESSAGE_FIELDS = frozenset({"messages", "prompt", "chosen", "rejected"})
"""Fields that may hold a list of messages."""
