"""Where a kind's data for a split lives: ``data.<kind>`` if set, else the ``data.dir`` layout.

One resolver, :func:`kind_paths`, used by every stage (the config's ``data`` section is passed in as
any object with ``dir`` and per-kind attributes; this package does not import the config)::

    data.<kind> set      that path, "{split}" replaced by the split name: a .parquet/.jsonl/.arrow
                         file, a save_to_disk Dataset directory, or a DatasetDict directory (then its
                         split's sub-directory)
    else data.dir        DIR/<kind>/<split>.parquet, DIR/<kind>/<split>.jsonl, or a save_to_disk
                         directory DIR/<kind>/<split>/ (also a DatasetDict at DIR/<kind>/), exactly one

Split names are ours (``train``, ``valid``, ``test``); a DatasetDict without ``valid`` but with
``validation`` (the usual Hugging Face name) gives that. Nothing found, or two candidates at once, is
one :class:`DataError` line naming what was looked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainers.errors import ConfigError, DataError

STATE_JSON = "state.json"
"""A save_to_disk Dataset directory's list of data files (``_data_files``)."""
DATASET_DICT_JSON = "dataset_dict.json"
"""A save_to_disk DatasetDict directory's list of splits (``splits``)."""
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {"valid": ("validation", "val", "dev")}
"""Hugging Face split names tried, in order, when a DatasetDict has no split of our name."""
SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl")
"""File names tried in the data.dir layout, in this order."""


def dataset_dict_splits(path: str | os.PathLike) -> list[str] | None:
    """The ``splits`` a DatasetDict directory's ``dataset_dict.json`` lists; None if unreadable."""
    try:
        splits = json.loads((Path(path) / DATASET_DICT_JSON).read_text(encoding="utf-8")).get("splits")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    ok = isinstance(splits, list) and all(isinstance(s, str) for s in splits)
    return splits if ok else None


def is_dataset_dict(path: str | os.PathLike) -> bool:
    """True for a directory holding ``dataset_dict.json`` (a save_to_disk DatasetDict)."""
    return (Path(path) / DATASET_DICT_JSON).is_file()


def dataset_dict_split(path: str | os.PathLike, split: str) -> Path | None:
    """The sub-directory of a DatasetDict directory for ``split`` (or an alias, see
    :data:`SPLIT_ALIASES`); None when it has none."""
    listed = dataset_dict_splits(path) or []
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if (name in listed or not listed) and (Path(path) / name).is_dir():
            return Path(path) / name
    return None


def find_split(data_dir: str | os.PathLike, kind: str, split: str) -> Path | None:
    """The one source of ``kind``/``split`` in the data.dir layout, or None when there is none.

    Candidates: ``DIR/<kind>/<split>.parquet``, ``.jsonl``, the directory ``DIR/<kind>/<split>/`` (or a
    DatasetDict at ``DIR/<kind>/``'s split). Two at once is a DataError: which one is meant is unclear.
    """
    base = Path(data_dir) / kind
    found = [base / f"{split}{suffix}" for suffix in SUFFIXES if (base / f"{split}{suffix}").is_file()]
    directory = dataset_dict_split(base, split) if is_dataset_dict(base) else None
    if directory is None and (base / split).is_dir():
        directory = base / split
    if directory is not None:
        found.append(directory)
    if len(found) > 1:
        raise DataError(
            f"{' and '.join(str(p) for p in found)} both hold {kind} data for split '{split}'; keep one"
        )
    return found[0] if found else None


def _explicit_path(kind: str, value: str, split: str) -> Path:
    """``data.<kind>`` for ``split``: ``{split}`` replaced; a DatasetDict directory gives its split."""
    path = Path(value.replace("{split}", split)).expanduser()
    if is_dataset_dict(path):
        sub = dataset_dict_split(path, split)
        if sub is None:
            splits = ", ".join(dataset_dict_splits(path) or []) or "none listed"
            raise DataError(
                f"{path}: the DatasetDict of data.{kind} has no split '{split}' (splits: {splits})"
            )
        return sub
    if not path.exists():
        raise DataError(f"{path}: file not found (data.{kind}={value})")
    return path


def kind_paths(data_cfg: object, kind: str, split: str) -> list[Path]:
    """The data paths of ``kind`` for ``split`` (one today; a list so a kind may later span files).

    ``data_cfg`` is the config's ``data`` section (``data_cfg.dir``, ``data_cfg.<kind>``). Raises
    :class:`ConfigError` when neither ``data.<kind>`` nor ``data.dir`` is set, :class:`DataError` (one
    line, starting with the path looked for) when nothing is there.
    """
    explicit = getattr(data_cfg, kind, None)
    if explicit:
        return [_explicit_path(kind, str(explicit), split)]
    data_dir = getattr(data_cfg, "dir", None)
    if not data_dir:
        raise ConfigError(
            f"data.dir is not set: give the data directory (e.g. the output of `rlhf data synth`) "
            f"or the {kind} data's own path as data.{kind}"
        )
    found = find_split(data_dir, kind, split)
    if found is None:
        base = Path(data_dir) / kind
        raise DataError(
            f"{base / split}.parquet: file not found (nor {split}.jsonl or a datasets save_to_disk "
            f"directory {split}/ in {base}; data.{kind} can name another path)"
        )
    return [found]
