"""Arrow column types of the data kinds (Parquet input and output): which Arrow type a column of each
field may have when read, and the one schema a kind's records are written with.

The record-level rules (fields, formats, checks) live in :mod:`trainers.data.schema`; this module only
maps them onto Arrow types.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from trainers.data.schema import (
    KEEPS_EXTRA,
    Format,
    default_format,
    is_integer,
    known_fields,
    record_format,
)
from trainers.errors import DataError


def _type_is(t: pa.DataType, *predicate_names: str) -> bool:
    """``pa.types.is_<name>(t)`` for any of the names; names missing from older pyarrow count as False."""
    return any(getattr(pa.types, f"is_{name}", lambda _t: False)(t) for name in predicate_names)


def _is_text_type(t: pa.DataType) -> bool:
    return _type_is(t, "string", "large_string", "string_view")


def _is_list_of(t: pa.DataType, pred: Callable[[pa.DataType], bool]) -> bool:
    is_list = _type_is(t, "list", "large_list", "list_view", "large_list_view")
    return is_list and (pred(t.value_type) or pa.types.is_null(t.value_type))


def _is_messages_type(t: pa.DataType) -> bool:
    """A list of structs with text ``role`` and ``content`` fields (other struct fields allowed: their
    values must be null, which the row check sees)."""
    if not _is_list_of(t, pa.types.is_struct):
        return False
    item = t.value_type
    if pa.types.is_null(item):
        return True
    names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return all(
        key in names and (_is_text_type(names[key]) or pa.types.is_null(names[key]))
        for key in ("role", "content")
    )


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
"""The Arrow type of a message list as ``prepare`` writes it (and as ``datasets`` does)."""

_COLUMN_TYPES: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    "text": ("string", _is_text_type),
    "text_list": ("list<string>", lambda t: _is_list_of(t, _is_text_type)),
    "int_list": ("list<int64>", lambda t: _is_list_of(t, pa.types.is_integer)),
    "user_id": ("string or integer", lambda t: _is_text_type(t) or pa.types.is_integer(t)),
    "messages": ("list<struct<role: string, content: string>>", _is_messages_type),
    "text_or_messages": (
        "string or list<struct<role: string, content: string>>",
        lambda t: _is_text_type(t) or _is_messages_type(t),
    ),
}

_FIELD_COLUMN: dict[str, str] = {
    "prompt": "text_or_messages",  # text only in demonstrations (see check_column_type)
    "response": "text",
    "text": "text",
    "task": "text",
    "answer": "text",
    "responses": "text_list",
    "options": "text_list",
    "ranking": "int_list",
    "user_id": "user_id",
    "messages": "messages",
    "chosen": "text_or_messages",
    "rejected": "text_or_messages",
}


def check_column_type(name: str, arrow_type: pa.DataType, kind: str | None = None) -> str | None:
    """Whether a Parquet column of a known field (of ``kind``: a demonstration's ``prompt`` is text
    only) has a usable Arrow type; a message if not.

    An all-null column (type ``null``) passes here; its nulls are reported row by row.
    """
    if pa.types.is_null(arrow_type):
        return None
    column = "text" if (kind, name) == ("demonstrations", "prompt") else _FIELD_COLUMN[name]
    expected, ok = _COLUMN_TYPES[column]
    return None if ok(arrow_type) else f"column type {_type_name(arrow_type)}, expected {expected}"


def _type_name(t: pa.DataType) -> str:
    """A short Arrow type name: ``list<double>`` rather than ``list<element: double>``."""
    if _type_is(t, "list", "large_list", "list_view", "large_list_view"):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


def _single_format(kind: str, records: list[dict]) -> Format:
    """The one format of valid ``records`` (the default when there are none); DataError if they mix
    formats (records read from files of different formats cannot share one output file)."""
    names: dict[str, Format] = {}
    for record in records:
        fmt = record_format(kind, record)[0]
        names.setdefault(fmt.name, fmt)
    if len(names) > 1:
        raise DataError(
            f"the {kind} records mix the {' and '.join(names)} formats; one output file holds one "
            "format: prepare the files of each format separately"
        )
    return next(iter(names.values()), default_format(kind))


def _extra_type(name: str, values: list) -> pa.DataType:
    """The Arrow type inferred for an extra prompts field; DataError if one column cannot hold them."""
    try:
        return pa.array(values).type
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise DataError(
            f"field '{name}': its values cannot be one Parquet column ({str(err).splitlines()[0]})"
        ) from None


def output_schema(kind: str, records: list[dict]) -> pa.Schema:
    """The Arrow schema written by ``prepare``: the records' format's required fields, then optional
    fields any record has, then (prompts) extra fields with inferred types.

    ``user_id`` is int64 when every id is an integer, otherwise string (integers are written as
    their decimal text so one column holds both). ``prompt``, ``chosen`` and ``rejected`` are
    message lists when any record has one there, else strings (see :func:`column_values`).
    """
    types = {"text": pa.string(), "text_list": pa.list_(pa.string()), "int_list": pa.list_(pa.int64())}
    types["messages"] = MESSAGES_TYPE
    fmt = _single_format(kind, records)
    present = {name for record in records for name in record}
    fields = []
    for name in known_fields(kind, fmt):
        if name not in fmt.required and name not in present:
            continue
        column = _FIELD_COLUMN[name]
        if name == "user_id":
            ids = [r["user_id"] for r in records if "user_id" in r]
            arrow_type = pa.int64() if all(is_integer(i) for i in ids) else pa.string()
        elif column == "text_or_messages":
            lists = any(isinstance(r.get(name), list) for r in records)
            arrow_type = MESSAGES_TYPE if lists else pa.string()
        else:
            arrow_type = types[column]
        fields.append(pa.field(name, arrow_type, nullable=name not in fmt.required))
    if kind in KEEPS_EXTRA:
        known = set(known_fields(kind, fmt))
        extras = dict.fromkeys(name for record in records for name in record if name not in known)
        for name in extras:
            fields.append(pa.field(name, _extra_type(name, [r.get(name) for r in records])))
    return pa.schema(fields)


def column_values(name: str, arrow_type: pa.DataType, values: list) -> list:
    """Values of one output column made to fit its type: a string ``prompt`` in a message-list column
    becomes one user turn, a string ``chosen``/``rejected`` one assistant turn; mixed integer and
    string ``user_id`` values become strings."""
    if name == "user_id" and pa.types.is_string(arrow_type):
        return [None if v is None else str(v) for v in values]
    if name in ("prompt", "chosen", "rejected") and arrow_type == MESSAGES_TYPE:
        role = "user" if name == "prompt" else "assistant"
        return [[{"role": role, "content": v}] if isinstance(v, str) else v for v in values]
    return values
