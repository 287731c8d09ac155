"""The output directory of a run: checked before any work, created (and cleared with ``--fresh``) after."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from trainers.errors import ConfigError
from trainers.files import atomic_write_text


def check_output_dir(out_dir: str | Path) -> Path:
    """The absolute output directory, checked to be creatable and writable; leaves nothing behind.

    Raises :class:`ConfigError` if ``out_dir`` is a file, or if it (or its nearest existing parent)
    is not writable. Permission bits do not stop root, and /proc or a read-only mount refuse what
    ``os.access`` allows, so the check creates (and at once removes) an empty hidden directory in the
    nearest existing directory.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory '{out}' exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    refused = f"output directory '{out}' is not writable ('{probe}' does not allow it)"
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(refused)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rlhf-write-check-", dir=probe))
    except OSError:
        raise ConfigError(refused) from None
    return out


def prepare_output(out: Path, config_yaml: str, fresh: bool) -> None:
    """Create a run's output directory (call only after validation passed) and write ``config_yaml`` (the
    resolved, redacted config: :func:`trainers.config.dump_yaml`) as ``config.yaml``; ``fresh`` removes an
    earlier run's checkpoints, logs, metrics and summary."""
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(out / "config.yaml", config_yaml)
