"""``metrics.jsonl``: one JSON object per logged step, written by one process, mirrored to the sinks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainers.files import atomic_write_text, jsonable
from trainers.runs.sinks import Sink


class MetricsWriter:
    """Appends one JSON object per logged step to ``OUT/metrics.jsonl`` and sends its numeric values, as
    ``<prefix>/<key>``, to every sink (:func:`trainers.runs.sinks.open_sinks`).

    Only one process (rank 0) writes. Each line is flushed at once so ``tail -f`` and a crash both see
    every completed step.
    """

    def __init__(self, out_dir: str | Path, prefix: str, sinks: Sequence[Sink] = ()):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._sinks = list(sinks)
        self._fh = self.path.open("a")

    def scalars(self, record: Mapping[str, Any]) -> dict[str, float]:
        """``{"<prefix>/<key>": value}`` for the numeric values of a record (not ``step``, not bools)."""
        return {
            f"{self.prefix}/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write ``{"step": step, **metrics}`` as one line (and the sinks' scalars); return the record."""
        record = jsonable({"step": int(step), **metrics})
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        scalars = self.scalars(record)
        for sink in self._sinks:
            sink.log(int(step), scalars)
        return record

    def close(self) -> None:
        """Flush and close the file and every sink (a W&B run is finished)."""
        self._fh.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep only the records of ``path`` with ``step <= last_step`` (resume); return how many were dropped.

    Unparseable lines (a line cut short by a crash) are dropped too. The file is rewritten atomically.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order; ``[]`` if it does not exist. Blank lines and a
    line a crash cut short are skipped (the writer flushes whole lines, so only the last can be cut)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
