"""Validation of data files, and the validated readers every stage uses.

Every problem is one self-contained line, in one of three forms:

- ``PATH:RECORD: field 'NAME': what is wrong`` -- a field of one record (RECORD is 1-based: the row
  number in Parquet, the line number in JSON Lines);
- ``PATH:RECORD: what is wrong`` -- a record as a whole (a line that is not JSON, not an object);
- ``PATH: what is wrong`` -- a whole file (missing, unreadable, unsupported extension, not Parquet,
  a Parquet column of the wrong type or missing: ``PATH: field 'NAME': ...``; a ``save_to_disk``
  directory without data files).

A path may be a ``datasets`` ``save_to_disk`` directory: its ``.arrow`` shards are checked as files of
their own (PATH is the shard, RECORD its row). Each file's format (:data:`~trainers.data.schema.
FORMATS`) is the one its first record selects (Parquet and Arrow: its columns); a later record of
another format is a problem (``field 'messages': a messages record in a file of prompt/response
records ...``).

At most ``max_problems`` (20) lines are kept, followed by ``... and N more problems``. Unknown
fields are warnings, not problems (``PATH:RECORD: field 'NAME': unknown field (ignored)``, once per
file and field; for Parquet ``PATH: field 'NAME': ...`` since a column spans every row); on prompts
they are kept (``extra field (kept)``). A dataset without a single record is a problem too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from trainers.data.columns import check_column_type
from trainers.data.io import (
    FileProblem,
    arrow_schema,
    file_format,
    iter_arrow,
    iter_jsonl,
    iter_parquet,
    parquet_schema,
    records_to_table,
    source_files,
)
from trainers.data.schema import (
    KEEPS_EXTRA,
    KINDS,
    Format,
    all_fields,
    check_record,
    clean_record,
    detect_format,
    json_type_name,
    record_format,
    unknown_fields,
)
from trainers.errors import DataError

MAX_PROBLEMS = 20

log = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """What :func:`validate_files` found. ``problems`` holds the first ``max_problems`` lines only."""

    problems: list[str] = field(default_factory=list)
    """The first ``max_problems`` problem lines, in file and record order."""
    warnings: list[str] = field(default_factory=list)
    """The first ``max_problems`` warning lines (unknown fields, empty files)."""
    n_records: int = 0
    """Records read (valid or not): Parquet rows plus non-blank JSON Lines lines."""
    n_files: int = 0
    """Input files looked at."""
    n_problems: int = 0
    """All problems found, including those beyond ``problems``."""
    n_warnings: int = 0
    """All warnings found, including those beyond ``warnings``."""
    max_problems: int = MAX_PROBLEMS
    """How many problem (and warning) lines are kept."""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return self.n_problems == 0

    def add_problem(self, line: str) -> None:
        """Count a problem; keep its line if fewer than ``max_problems`` are kept."""
        self.n_problems += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(line)

    def add_warning(self, line: str) -> None:
        """Count a warning; keep its line if fewer than ``max_problems`` are kept."""
        self.n_warnings += 1
        if len(self.warnings) < self.max_problems:
            self.warnings.append(line)

    def problem_lines(self) -> list[str]:
        """The kept problem lines plus ``... and N more problems`` when some were left out."""
        more = self.n_problems - len(self.problems)
        return self.problems + ([f"... and {more} more problems"] if more > 0 else [])

    def warning_lines(self) -> list[str]:
        """The kept warning lines plus ``... and N more warnings`` when some were left out."""
        more = self.n_warnings - len(self.warnings)
        return self.warnings + ([f"... and {more} more warnings"] if more > 0 else [])


def check_kind(kind: str) -> None:
    """Raise :class:`DataError` for a kind that is not one of :data:`KINDS`."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind '{kind}'; expected one of: {', '.join(KINDS)}")


class _FileChecker:
    """Checks the records of one file into a report; collects ``(format, clean record)`` pairs into
    ``sink`` if given."""

    def __init__(self, kind: str, path: str, report: ValidationReport, sink: list | None):
        self.kind, self.path, self.report, self.sink = kind, path, report, sink
        self.skip: frozenset[str] = frozenset()  # fields already reported for the whole file
        self.warned: set[str] = set()  # unknown fields already warned about in this file
        self.n_records = 0
        self.fmt: Format | None = None  # the file's format, once a record (or the columns) chose it
        self.fmt_from = ""  # where it was chosen: "record 3", "its columns"

    def _unknown(self, where: str, name: str) -> None:
        """Warn once per file about a field the schema does not define."""
        if name in self.warned:
            return
        self.warned.add(name)
        what = "extra field (kept)" if self.kind in KEEPS_EXTRA else "unknown field (ignored)"
        self.report.add_warning(f"{where}: field '{name}': {what}")

    def _format_of(self, rec_no: int, record: dict) -> Format | None:
        """The format to check ``record`` against; None (with the problem reported) when it holds two
        formats or is of another format than the file's earlier records."""
        fmt, selected, problem = record_format(self.kind, record)
        if problem is not None:
            self.report.add_problem(f"{self.path}:{rec_no}: field '{problem[0]}': {problem[1]}")
            return None
        if not selected:
            return self.fmt or fmt
        if self.fmt is None:
            self.fmt, self.fmt_from = fmt, f"record {rec_no}"
        elif fmt != self.fmt:
            name = next(n for n in fmt.signature if record.get(n) is not None)
            self.report.add_problem(
                f"{self.path}:{rec_no}: field '{name}': a {fmt.name} record in a file of {self.fmt.name} "
                f"records ({self.fmt_from}); one file holds one format"
            )
            return None
        return fmt

    def record(self, rec_no: int, record: object) -> None:
        """Check one parsed record (any JSON value) and keep it if valid."""
        self.n_records += 1
        if not isinstance(record, dict):
            self.report.add_problem(
                f"{self.path}:{rec_no}: expected a JSON object, got {json_type_name(record)}"
            )
            return
        fmt = self._format_of(rec_no, record)
        if fmt is None:
            return
        for name, message in check_record(self.kind, record, self.skip, fmt):
            self.report.add_problem(f"{self.path}:{rec_no}: field '{name}': {message}")
        for name in unknown_fields(self.kind, record, fmt):
            self._unknown(f"{self.path}:{rec_no}", name)
        # Once anything is wrong the records will not be returned: stop holding them in memory.
        if self.sink is not None and self.report.ok:
            self.sink.append((fmt, clean_record(self.kind, record, fmt)))

    def jsonl(self) -> None:
        """Check every line of a JSON Lines file."""
        for line_no, value, problem in iter_jsonl(self.path):
            if problem is not None:
                self.n_records += 1
                self.report.add_problem(f"{self.path}:{line_no}: {problem}")
            else:
                self.record(line_no, value)

    def table(self, schema: pa.Schema, rows) -> None:
        """Check the column types of a Parquet or Arrow file once, then every row (``rows(columns)``
        yields ``(row_no, record)``). The columns choose the format unless they hold two formats'
        fields (then each row's non-null fields do)."""
        known = all_fields(self.kind)
        skip = set()
        for column in schema:
            if column.name not in known:
                self._unknown(self.path, column.name)
            elif (message := check_column_type(column.name, column.type, self.kind)) is not None:
                self.report.add_problem(f"{self.path}: field '{column.name}': {message}")
                skip.add(column.name)
        fmt, selected, problem = detect_format(self.kind, schema.names)
        if problem is None:
            if selected:
                self.fmt, self.fmt_from = fmt, "its columns"
            for name in fmt.required:
                if name not in schema.names:
                    self.report.add_problem(f"{self.path}: field '{name}': missing column")
                    skip.add(name)
        self.skip = frozenset(skip)
        keep = set(known) | (set(schema.names) if self.kind in KEEPS_EXTRA else set())
        for row_no, record in rows([name for name in schema.names if name in keep and name not in skip]):
            self.record(row_no, record)

    def run(self) -> None:
        """Check the file; a whole-file problem becomes one ``PATH: ...`` line."""
        try:
            kind_of_file = file_format(self.path)
            if kind_of_file == "parquet":
                self.table(parquet_schema(self.path), lambda columns: iter_parquet(self.path, columns))
            elif kind_of_file == "arrow":
                self.table(arrow_schema(self.path), lambda columns: iter_arrow(self.path, columns))
            else:
                self.jsonl()
        except FileProblem as problem:
            self.report.add_problem(f"{self.path}: {problem}")
            return
        if self.n_records == 0:
            self.report.add_warning(f"{self.path}: no records")


def _check_files(
    kind: str, paths: Sequence[str | os.PathLike], max_problems: int, sink: list | None
) -> ValidationReport:
    """Validate every file in order into one report (a ``save_to_disk`` directory: each of its data
    files); fill ``sink`` with ``(format, clean record)`` pairs if given."""
    check_kind(kind)
    report = ValidationReport(max_problems=max_problems)
    if not paths:
        report.add_problem("no input files given")
        return report
    for path in paths:
        try:
            files = source_files(path)
        except FileProblem as problem:
            report.add_problem(f"{path}: {problem}")
            report.n_files += 1
            continue
        for file in files:
            checker = _FileChecker(kind, str(file), report, sink)
            checker.run()
            report.n_files += 1
            report.n_records += checker.n_records
    if report.ok and report.n_records == 0:
        shown = ", ".join(str(p) for p in paths)
        report.add_problem(f"{shown}: no records" if len(paths) == 1 else f"no records in any of: {shown}")
    return report


def validate_files(
    kind: str, paths: Sequence[str | os.PathLike], *, max_problems: int = MAX_PROBLEMS
) -> ValidationReport:
    """Check data files of ``kind`` (see :mod:`trainers.data.schema`) without keeping the records.

    Never raises for bad data: every problem is a line in the report (an unknown ``kind`` raises
    :class:`DataError`).
    """
    return _check_files(kind, paths, max_problems, sink=None)


def read_records(
    kind: str, paths: Sequence[str | os.PathLike], *, max_problems: int = MAX_PROBLEMS
) -> list[dict]:
    """Read and validate data files of ``kind``; the records in file order, each in its file's format
    (see :mod:`trainers.data.schema`), known fields only (prompts: extra fields too). Stages that take
    every format read :func:`trainers.data.conversations.read_conversations` instead.

    Raises :class:`DataError` whose ``lines`` are the problem lines (first ``max_problems``, then
    ``... and N more problems``) if anything is wrong. Warnings go to the log, only when the files are
    valid: with problems, the problem lines alone are the message (a failing run prints nothing else).
    """
    return [record for _, record in read_formatted(kind, paths, max_problems=max_problems)]


def read_formatted(
    kind: str, paths: Sequence[str | os.PathLike], *, max_problems: int = MAX_PROBLEMS
) -> list[tuple[Format, dict]]:
    """:func:`read_records` with each record's format (its file's): ``[(format, record), ...]``."""
    records: list[tuple[Format, dict]] = []
    report = _check_files(kind, paths, max_problems, sink=records)
    if not report.ok:
        lines = report.problem_lines()
        raise DataError(lines[0], lines=lines)
    for line in report.warning_lines():
        log.warning("%s", line)
    return records


def read_table(
    kind: str, paths: Sequence[str | os.PathLike], *, max_problems: int = MAX_PROBLEMS
) -> pa.Table:
    """:func:`read_records` as one Arrow table (columns in schema order, see :func:`trainers.data.columns.output_schema`)."""
    return records_to_table(kind, read_records(kind, paths, max_problems=max_problems))


def length_problems(lengths: Sequence[int], path: str | os.PathLike, max_len: int, what: str) -> list[str]:
    """``PATH:ROW: ...`` lines (1-based rows) for examples longer than ``max_len`` tokens, at most
    :data:`MAX_PROBLEMS` of them and then ``... and N more problems`` (as validation reports)."""
    lines = [
        f"{path}:{row + 1}: {what} is {n} tokens long, more than model.max_len={max_len}"
        for row, n in enumerate(lengths)
        if n > max_len
    ]
    if len(lines) > MAX_PROBLEMS:
        lines = lines[:MAX_PROBLEMS] + [f"... and {len(lines) - MAX_PROBLEMS} more problems"]
    return lines


def raise_if_problems(lines: list[str]) -> None:
    """DataError with ``lines`` (printed verbatim by the CLI) when there are any."""
    if lines:
        raise DataError(lines[0], lines=lines)
