"""Record schemas of the four data kinds and the per-record checks.

A *record* is one JSON object (JSONL) or one row (Parquet) turned into a Python dict. Each kind has
required fields; every kind also accepts the optional fields below. Checks return plain messages
(``"empty or whitespace-only string"``); :mod:`trainers.data.validate` adds the ``PATH:RECORD:
field 'NAME':`` part.

| kind | required | meaning |
|---|---|---|
| ``demonstrations`` | ``prompt: str``, ``response: str`` | a labeler-written answer (SFT) |
| ``comparisons`` | ``prompt: str``, ``responses: list[str]`` (K >= 2), ``ranking: list[int]`` (length K) | a ranking of K responses (RM); 0 = best, equal = tie, at least two distinct ranks |
| ``prompts`` | ``prompt: str`` | a prompt for PPO rollouts / evaluation |
| ``pretrain`` | ``text: str`` | pretraining text (stage 0 and the ptx term) |

Optional on every kind: ``user_id`` (string or integer; the unit of the per-user cap and of the
train/valid/test split), ``task`` (string), and, written by the synthetic world on classification
and closed-QA rows, ``options`` (list of non-empty strings) and ``answer`` (string). A null optional
field counts as absent (Parquet writes nulls where some rows lack a column); a null required field is
a problem.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

KINDS: tuple[str, ...] = ("demonstrations", "comparisons", "prompts", "pretrain")

REQUIRED: dict[str, tuple[str, ...]] = {
    "demonstrations": ("prompt", "response"),
    "comparisons": ("prompt", "responses", "ranking"),
    "prompts": ("prompt",),
    "pretrain": ("text",),
}

OPTIONAL: tuple[str, ...] = ("user_id", "task", "options", "answer")


def known_fields(kind: str) -> tuple[str, ...]:
    """All fields a record of ``kind`` may carry: required first, then optional (output column order)."""
    return REQUIRED[kind] + OPTIONAL


def key_field(kind: str) -> str:
    """The text field that identifies a record for deduplication: ``text`` for pretrain, else ``prompt``."""
    return "text" if kind == "pretrain" else "prompt"


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


def _is_int(value: object) -> bool:
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
        if not _is_int(rank):
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
    if _is_int(value):
        return None
    if isinstance(value, str):
        return None if value.strip() else "empty or whitespace-only string"
    return f"expected a string or integer, got {json_type_name(value)}"


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
}


def check_record(kind: str, record: dict, skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Problems of one record as ``(field, message)`` pairs, in field order; empty when valid.

    ``skip`` names fields already reported for the whole file (a Parquet column of the wrong type),
    so they are not reported again on every row. Unknown fields are not problems (see
    :func:`unknown_fields`).
    """
    problems: list[tuple[str, str]] = []
    for name in REQUIRED[kind]:
        if name in skip:
            continue
        if name not in record:
            problems.append((name, "missing"))
        elif record[name] is None:
            problems.append((name, "null value"))
        elif (msg := CHECKS[name](record[name])) is not None:
            problems.append((name, msg))
    for name in OPTIONAL:
        value = record.get(name)
        if name not in skip and value is not None and (msg := CHECKS[name](value)) is not None:
            problems.append((name, msg))
    pair = {"responses", "ranking"}
    # Only meaningful once both lists are individually valid.
    both_valid = kind == "comparisons" and not skip & pair and not pair & {name for name, _ in problems}
    if both_valid and (msg := check_ranking_against(record["responses"], record["ranking"])) is not None:
        problems.append(("ranking", msg))
    return problems


def unknown_fields(kind: str, record: dict) -> list[str]:
    """Fields of ``record`` that ``kind`` does not define (warned about and ignored)."""
    known = set(known_fields(kind))
    return [name for name in record if name not in known]


def clean_record(kind: str, record: dict) -> dict:
    """A validated record reduced to its known fields, in schema order, absent optional fields dropped."""
    return {name: record[name] for name in known_fields(kind) if record.get(name) is not None}


# ----------------------------------------------------------------------------------------------------
# Arrow column types (Parquet input and output)


def _type_is(t: pa.DataType, *predicate_names: str) -> bool:
    """``pa.types.is_<name>(t)`` for any of the names; names missing from older pyarrow count as False."""
    return any(getattr(pa.types, f"is_{name}", lambda _t: False)(t) for name in predicate_names)


def _is_text_type(t: pa.DataType) -> bool:
    return _type_is(t, "string", "large_string", "string_view")


def _is_list_of(t: pa.DataType, pred: Callable[[pa.DataType], bool]) -> bool:
    is_list = _type_is(t, "list", "large_list", "list_view", "large_list_view")
    return is_list and (pred(t.value_type) or pa.types.is_null(t.value_type))


_COLUMN_TYPES: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    "text": ("string", _is_text_type),
    "text_list": ("list<string>", lambda t: _is_list_of(t, _is_text_type)),
    "int_list": ("list<int64>", lambda t: _is_list_of(t, pa.types.is_integer)),
    "user_id": ("string or integer", lambda t: _is_text_type(t) or pa.types.is_integer(t)),
}

_FIELD_COLUMN: dict[str, str] = {
    "prompt": "text",
    "response": "text",
    "text": "text",
    "task": "text",
    "answer": "text",
    "responses": "text_list",
    "options": "text_list",
    "ranking": "int_list",
    "user_id": "user_id",
}


def check_column_type(name: str, arrow_type: pa.DataType) -> str | None:
    """Whether a Parquet column of a known field has a usable Arrow type; a message if not.

    An all-null column (type ``null``) passes here; its nulls are reported row by row.
    """
    if pa.types.is_null(arrow_type):
        return None
    expected, ok = _COLUMN_TYPES[_FIELD_COLUMN[name]]
    return None if ok(arrow_type) else f"column type {_type_name(arrow_type)}, expected {expected}"


def _type_name(t: pa.DataType) -> str:
    """A short Arrow type name: ``list<double>`` rather than ``list<element: double>``."""
    if _type_is(t, "list", "large_list", "list_view", "large_list_view"):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


def output_schema(kind: str, records: list[dict]) -> pa.Schema:
    """The Arrow schema written by ``prepare``: required fields, then optional fields any record has.

    ``user_id`` is int64 when every id is an integer, otherwise string (integers are written as
    their decimal text so one column holds both).
    """
    types = {"text": pa.string(), "text_list": pa.list_(pa.string()), "int_list": pa.list_(pa.int64())}
    present = {name for record in records for name in record}
    fields = []
    for name in known_fields(kind):
        if name not in REQUIRED[kind] and name not in present:
            continue
        if name == "user_id":
            ids = [r["user_id"] for r in records if "user_id" in r]
            arrow_type = pa.int64() if all(_is_int(i) for i in ids) else pa.string()
        else:
            arrow_type = types[_FIELD_COLUMN[name]]
        fields.append(pa.field(name, arrow_type, nullable=name not in REQUIRED[kind]))
    return pa.schema(fields)
