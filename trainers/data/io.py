"""Reading and writing data files: JSON Lines, Parquet and ``datasets`` directories, with pyarrow.

These functions only read and write; they do not judge records (that is
:mod:`trainers.data.validate`). A problem with a whole file (missing, unreadable, not Parquet,
unsupported extension) is raised as :class:`FileProblem`, whose message does not repeat the path.

Formats, chosen by extension:

- ``.parquet``: one record per row, one field per column.
- ``.jsonl`` and ``.json``: JSON Lines, one JSON object per line. Blank lines are skipped; a record's
  number is its 1-based line number, so problem lines point at the line to fix. Lines are parsed one
  by one with :mod:`json` (rather than ``pyarrow.json``) so a bad line can be named exactly.
- ``.arrow``: an Arrow IPC stream (what Hugging Face ``datasets`` writes; the IPC file format is read
  too), one record per row.
- a directory written by ``datasets``' ``save_to_disk`` (:func:`dataset_files`): a *Dataset* directory
  (``state.json`` listing its ``data-*.arrow`` shards under ``_data_files``, ``dataset_info.json``)
  or a *DatasetDict* directory (``dataset_dict.json`` listing ``splits``, one Dataset directory per
  split). It is read with pyarrow alone; a record's number is its 1-based row within its shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.data.columns import column_values, output_schema
from trainers.data.sources import DATASET_DICT_JSON, STATE_JSON, dataset_dict_splits, find_split
from trainers.errors import ConfigError

SUFFIXES: dict[str, str] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".arrow": "arrow"}
PARQUET_BATCH_ROWS = 4096


class FileProblem(Exception):
    """A problem with a whole file; ``str(err)`` says what, without the path."""


def _one_line(err: BaseException) -> str:
    """First line of an exception message (Arrow messages can span several lines)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def data_path(data_dir: str | os.PathLike | None, kind: str, split: str) -> Path:
    """The data of ``kind`` for ``split`` in ``DATA_DIR``: ``<kind>/<split>.parquet`` (the layout `rlhf
    data synth` writes), ``.jsonl`` or a ``save_to_disk`` directory, whichever exists (see
    :func:`trainers.data.sources.find_split`); the ``.parquet`` path when none does, so that reading it
    says "file not found". A ConfigError naming ``data.dir`` when no directory is given; a DataError
    when two of them exist. :func:`trainers.data.sources.kind_paths` also honours ``data.<kind>``."""
    if not data_dir:
        raise ConfigError(
            "data.dir is not set: give the data directory (e.g. the output of `rlhf data synth`)"
        )
    found = find_split(data_dir, kind, split)
    return found if found is not None else Path(data_dir) / kind / f"{split}.parquet"


def file_format(path: str | os.PathLike) -> str:
    """``"parquet"``, ``"jsonl"`` or ``"arrow"`` from the extension; :class:`FileProblem` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        shown = f"'{suffix}'" if suffix else "(none)"
        raise FileProblem(f"unsupported file extension {shown}; expected .parquet, .jsonl, .json or .arrow")
    return SUFFIXES[suffix]


def _read_json(path: Path) -> object:
    """A small JSON file of a ``datasets`` directory; :class:`FileProblem` naming it if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileProblem(f"{path.name} is not readable JSON ({_one_line(err)})") from None


def _dataset_shards(path: Path, where: str) -> list[Path]:
    """The ``.arrow`` shards of one Dataset directory, in ``state.json`` order (sorted ``data-*.arrow``
    when there is no ``state.json``); ``where`` prefixes messages about a DatasetDict's split."""
    state_path = path / STATE_JSON
    if state_path.is_file():
        state = _read_json(state_path)
        entries = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
            raise FileProblem(f"{where}{STATE_JSON} has no '_data_files' list of {{filename}} entries")
        shards = [path / str(entry["filename"]) for entry in entries]
        for shard in shards:
            if not shard.is_file():
                raise FileProblem(f"{where}{STATE_JSON} lists {shard.name}, which does not exist")
    else:
        shards = sorted(path.glob("data-*.arrow"))
    if not shards:
        raise FileProblem(f"{where}a datasets save_to_disk directory without data files (no data-*.arrow)")
    return shards


def dataset_files(path: str | os.PathLike) -> list[Path]:
    """The data files of a ``save_to_disk`` directory: a Dataset's shards, or every split's shards of a
    DatasetDict (in ``dataset_dict.json`` order). :class:`FileProblem` for a directory that is neither
    or holds no data files."""
    p = Path(path)
    if (p / DATASET_DICT_JSON).is_file():
        splits = dataset_dict_splits(p)
        if splits is None:
            raise FileProblem(f"{DATASET_DICT_JSON} has no 'splits' list")
        files = []
        for split in splits:
            if not (p / split).is_dir():
                raise FileProblem(f"split '{split}' of {DATASET_DICT_JSON} has no directory {split}/")
            files += _dataset_shards(p / split, f"split '{split}': ")
        if not files:
            raise FileProblem("a datasets save_to_disk directory without data files (no splits)")
        return files
    markers = (STATE_JSON, "dataset_info.json")
    if any((p / name).is_file() for name in markers) or any(p.glob("data-*.arrow")):
        return _dataset_shards(p, "")
    raise FileProblem(
        "is a directory, expected a data file (.parquet, .jsonl) or a datasets save_to_disk directory"
    )


def source_files(path: str | os.PathLike) -> list[Path]:
    """The data files one input path stands for: itself, or a ``save_to_disk`` directory's shards."""
    p = Path(path)
    return dataset_files(p) if p.is_dir() else [p]


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


def _open_arrow(source: pa.NativeFile) -> pa.ipc.RecordBatchStreamReader | pa.ipc.RecordBatchFileReader:
    """An IPC stream reader (``datasets``' format), else an IPC file reader, over an opened file."""
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def arrow_schema(path: str | os.PathLike) -> pa.Schema:
    """The schema of an Arrow IPC file; :class:`FileProblem` if it is not readable Arrow."""
    check_readable(path)
    try:
        with pa.memory_map(str(path)) as source:
            return _open_arrow(source).schema
    except (pa.ArrowException, OSError) as err:
        raise FileProblem(f"not a readable Arrow file ({_one_line(err)})") from None


def _arrow_batches(reader) -> Iterator[pa.RecordBatch]:
    """Record batches of a stream or file reader."""
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def iter_arrow(path: str | os.PathLike, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_no, record)`` (1-based) for each row of an Arrow IPC file, only ``columns``."""
    try:
        with pa.memory_map(str(path)) as source:
            row_no = 0
            for batch in _arrow_batches(_open_arrow(source)):
                for record in batch.select(columns).to_pylist():
                    row_no += 1
                    yield row_no, record
    except (pa.ArrowException, OSError) as err:
        raise FileProblem(f"not a readable Arrow file ({_one_line(err)})") from None


def records_to_table(kind: str, records: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """Validated records of ``kind`` as an Arrow table.

    ``schema`` defaults to :func:`~trainers.data.columns.output_schema` of these records; pass one
    to give several tables (the splits of one data set) the same columns.
    """
    if schema is None:
        schema = output_schema(kind, records)
    columns = {}
    for field in schema:
        columns[field.name] = column_values(field.name, field.type, [r.get(field.name) for r in records])
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
