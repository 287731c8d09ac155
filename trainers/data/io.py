"""Reading and writing data files: JSON Lines and Parquet, with pyarrow.

These functions only read and write; they do not judge records (that is
:mod:`trainers.data.validate`). A problem with a whole file (missing, unreadable, not Parquet,
unsupported extension) is raised as :class:`FileProblem`, whose message does not repeat the path.

Formats, chosen by extension:

- ``.parquet``: one record per row, one field per column.
- ``.jsonl`` and ``.json``: JSON Lines, one JSON object per line. Blank lines are skipped; a record's
  number is its 1-based line number, so problem lines point at the line to fix. Lines are parsed one
  by one with :mod:`json` (rather than ``pyarrow.json``) so a bad line can be named exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.data.schema import output_schema
from trainers.errors import ConfigError

SUFFIXES: dict[str, str] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
PARQUET_BATCH_ROWS = 4096


class FileProblem(Exception):
    """A problem with a whole file; ``str(err)`` says what, without the path."""


def _one_line(err: BaseException) -> str:
    """First line of an exception message (Arrow messages can span several lines)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def data_path(data_dir: str | os.PathLike | None, kind: str, split: str) -> Path:
    """``DATA_DIR/<kind>/<split>.parquet``, the layout `rlhf data synth` writes; a ConfigError naming
    ``data.dir`` when no directory is given."""
    if not data_dir:
        raise ConfigError(
            "data.dir is not set: give the data directory (e.g. the output of `rlhf data synth`)"
        )
    return Path(data_dir) / kind / f"{split}.parquet"


def file_format(path: str | os.PathLike) -> str:
    """``"parquet"`` or ``"jsonl"`` from the extension; :class:`FileProblem` for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        shown = f"'{suffix}'" if suffix else "(none)"
        raise FileProblem(f"unsupported file extension {shown}; expected .parquet, .jsonl or .json")
    return SUFFIXES[suffix]


def check_readable(path: str | os.PathLike) -> None:
    """Raise :class:`FileProblem` if ``path`` is missing, a directory or cannot be opened."""
    p = Path(path)
    if not p.exists():
        raise FileProblem("file not found")
    if p.is_dir():
        raise FileProblem("is a directory, expected a data file")
    try:
        with open(p, "rb"):
            pass
    except OSError as err:
        raise FileProblem(f"cannot read file ({err.strerror or _one_line(err)})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object, str | None]]:
    """Yield ``(line_no, value, problem)`` for each non-blank line; ``problem`` set when it is no JSON.

    ``value`` is whatever the line parsed to (an object is expected; the validator says otherwise).
    A file that starts with ``[`` is a JSON array, not JSON Lines: :class:`FileProblem`.
    """
    check_readable(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield line_no, None, f"not valid UTF-8 (byte {err.start + 1})"
                continue
            if not line.strip():
                continue
            if line_no == 1 and line.lstrip().startswith("["):
                raise FileProblem("is a JSON array; expected JSON Lines (one JSON object per line)")
            try:
                yield line_no, json.loads(line), None
            except json.JSONDecodeError as err:
                yield line_no, None, f"not valid JSON ({err.msg} at column {err.colno})"


def parquet_schema(path: str | os.PathLike) -> pa.Schema:
    """The Arrow schema of a Parquet file; :class:`FileProblem` if it is not readable Parquet."""
    check_readable(path)
    try:
        return pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError) as err:
        raise FileProblem(f"not a readable Parquet file ({_one_line(err)})") from None


def iter_parquet(path: str | os.PathLike, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_no, record)`` (1-based) for each row, reading only ``columns``, batch by batch."""
    try:
        parquet = pq.ParquetFile(path)
        row_no = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                row_no += 1
                yield row_no, record
    except (pa.ArrowException, OSError) as err:
        raise FileProblem(f"not a readable Parquet file ({_one_line(err)})") from None


def records_to_table(kind: str, records: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """Validated records of ``kind`` as an Arrow table.

    ``schema`` defaults to :func:`~trainers.data.schema.output_schema` of these records; pass one
    to give several tables (the splits of one data set) the same columns.
    """
    if schema is None:
        schema = output_schema(kind, records)
    columns = {}
    for field in schema:
        values = [record.get(field.name) for record in records]
        if field.name == "user_id" and pa.types.is_string(field.type):
            # Mixed integer and string ids share one string column.
            values = [None if v is None else str(v) for v in values]
        columns[field.name] = values
    return pa.Table.from_pydict(columns, schema=schema)


def write_parquet(path: str | os.PathLike, kind: str, records: list[dict]) -> None:
    """Write validated records of ``kind`` to one Parquet file (not atomic; see ``write_atomic``)."""
    pq.write_table(records_to_table(kind, records), path)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records as JSON Lines (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_tables_atomic(tables: dict[str, pa.Table], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``{file_name: table}`` into ``out_dir`` so no reader ever sees a half-written file.

    Every table goes to a hidden temporary name in ``out_dir`` first (same file system, so the rename
    is atomic); only when all are written are they renamed into place. On failure the temporaries
    are removed and nothing is replaced.
    """
    out = Path(out_dir)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, table in tables.items():
            tmp = out / f".{name}.tmp-{os.getpid()}"
            staged.append((tmp, out / name))
            pq.write_table(table, tmp)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    return [final for _, final in staged]
