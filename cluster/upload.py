"""What ``ray job submit --working-dir DIR`` would upload, measured before submitting (``rlhf upload-size``).

    rlhf upload-size .                      # files, bytes, the largest files; exit 2 over the limit
    rlhf upload-size . --exclude 'data/*'   # as with runtime_env={"excludes": [...]}

The walk is Ray's own: ``ray._private.runtime_env.packaging._dir_travel`` with the excludes Ray builds
for a working_dir (``working_dir.upload_working_dir_if_needed``: Ray's default excludes, overridable by
``RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES``, plus the runtime_env's ``excludes``), and the
``.gitignore`` (unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``) and ``.rayignore`` of every directory it
enters. A file is counted when Ray would pack it: the same "file, or empty directory" test as Ray's
``_zip_files``. ``tests/unit/test_upload_size.py`` checks the result against the zip Ray itself builds.

Ray stores the files uncompressed (``ZipFile`` default ``ZIP_STORED``), so the package is the files'
bytes plus the zip's per-entry headers. ``ray job submit`` sends it in one HTTP request to the head's
dashboard, whose request limit (``DASHBOARD_CLIENT_MAX_SIZE``, 100 MiB) is lower than the GCS limit the
package then has to fit (``GCS_STORAGE_MAX_SIZE``, the gRPC message limit, 512 MiB).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trainers.errors import UserError

ZIP_LOCAL_HEADER = 30
"""Bytes of a zip local file header before the name (PKWARE APPNOTE 4.3.7)."""
ZIP_CENTRAL_HEADER = 46
"""Bytes of a central directory entry before the name (APPNOTE 4.3.12)."""
ZIP_END_RECORD = 22
"""Bytes of the end of central directory record without a comment (APPNOTE 4.3.16)."""
IGNORE_FILES = (".gitignore", ".rayignore")
"""The ignore files Ray reads in every directory of a working_dir (``get_excludes_from_ignore_files``)."""


@dataclass(frozen=True)
class Upload:
    """What Ray would pack from one directory."""

    root: Path
    """The working_dir, absolute."""
    entries: tuple[tuple[str, int], ...]
    """(zip entry name, bytes) for each packed file (and empty directory, name ending in ``/``), largest
    first; names are relative to ``root``, ``/``-separated."""
    excludes: tuple[str, ...]
    """The patterns on top of the ignore files: Ray's defaults, then the runtime_env's ``excludes``."""
    ignore_files: tuple[str, ...]
    """The ignore files Ray read, relative to ``root`` (those inside excluded directories are not read)."""

    @property
    def file_bytes(self) -> int:
        """The packed files' own bytes."""
        return sum(size for _, size in self.entries)

    @property
    def zip_bytes(self) -> int:
        """The size of Ray's zip: every entry's data, its name twice (local and central header) and the
        fixed header bytes. Exact for stored entries under 4 GiB, fewer than 65,535 of them (no zip64)."""
        names = sum(len(name.encode()) for name, _ in self.entries)
        fixed = (ZIP_LOCAL_HEADER + ZIP_CENTRAL_HEADER) * len(self.entries) + ZIP_END_RECORD
        return self.file_bytes + 2 * names + fixed


def job_upload_limit() -> int:
    """The largest package ``ray job submit`` gets onto a cluster, in bytes: the dashboard rejects a
    request body over ``DASHBOARD_CLIENT_MAX_SIZE`` and the GCS a package of ``GCS_STORAGE_MAX_SIZE`` or
    more. Both are read here, on the client; the head applies its own (the same unless the head was
    started with another ``RAY_max_grpc_message_size``)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return min(ray_constants.DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE - 1)


def measure_upload(directory: str | Path, excludes: tuple[str, ...] = ()) -> Upload:
    """Walk ``directory`` as Ray packs a working_dir, with ``excludes`` as the runtime_env's; nothing is
    read but names and sizes. Raises :class:`UserError` if ``directory`` is not a directory."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(directory).expanduser().absolute()
    if not root.is_dir():
        raise UserError(
            f"upload-size: '{directory}' is not a directory (ray job submit --working-dir takes one)"
        )
    # The same two switches the job client reads (ray/dashboard/modules/dashboard_sdk.py).
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    patterns = (*ray_constants.get_runtime_env_default_excludes(), *excludes)
    entries: list[tuple[str, int]] = []
    ignore_files: list[str] = []

    def pack(path: Path) -> None:
        # Ray's _zip_files handler: a file, or a directory with nothing in it, becomes one zip entry.
        if path.is_dir():
            names = IGNORE_FILES if include_gitignore else IGNORE_FILES[1:]
            ignore_files.extend(str((path / n).relative_to(root)) for n in names if (path / n).is_file())
            if next(path.iterdir(), None) is None and path != root:
                entries.append((path.relative_to(root).as_posix() + "/", 0))
        elif path.is_file():
            entries.append((path.relative_to(root).as_posix(), path.stat().st_size))

    quiet = logging.getLogger(__name__)  # Ray logs each ignore file it reads at INFO
    _dir_travel(
        root, [_get_excludes(root, list(patterns))], pack, include_gitignore=include_gitignore, logger=quiet
    )
    entries.sort(key=lambda e: (-e[1], e[0]))
    return Upload(root, tuple(entries), patterns, tuple(ignore_files))


def human(num_bytes: int) -> str:
    """``1.6 MiB``, ``91.6 KiB``, ``42 B``: binary units, as Ray's own upload messages."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def report(upload: Upload, largest: int = 5) -> list[str]:
    """The lines ``rlhf upload-size`` prints: the totals against the limit, what excluded what, the
    ``largest`` biggest files."""
    lines = [
        f"ray job submit --working-dir {upload.root} would upload {len(upload.entries)} files, "
        f"{human(upload.file_bytes)} (a zip of {upload.zip_bytes:,} bytes; Ray's job API takes up to "
        f"{human(job_upload_limit())})",
        f"excluded by: {', '.join(upload.ignore_files) or 'no ignore file'}; "
        f"patterns {', '.join(upload.excludes) or '(none)'}",
        "largest:",
    ]
    lines += [f"  {human(size):>10}  {name}" for name, size in upload.entries[:largest]]
    return lines


def check_upload(upload: Upload, largest: int = 3) -> None:
    """Raise :class:`UserError` (one line: the size, the limit, the biggest offenders, the fix) when Ray
    would reject the upload."""
    limit = job_upload_limit()
    if upload.zip_bytes <= limit:
        return
    worst = ", ".join(f"{name} ({human(size)})" for name, size in upload.entries[:largest])
    raise UserError(
        f"ray job submit --working-dir {upload.root} would upload {human(upload.zip_bytes)}, more than the "
        f"{human(limit)} Ray's job API accepts (DASHBOARD_CLIENT_MAX_SIZE); largest: {worst}; list them in "
        f"{upload.root / '.rayignore'} (or pass runtime_env excludes) and put data and checkpoints on storage "
        "the cluster reads"
    )
