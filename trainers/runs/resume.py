"""Resuming a run: whether a checkpoint fits this run, and the words that tell a user where a rerun resumes.

PPO and the Ray Train stages share both, so a stopped run (lost rank, non-finite steps) and a refused
resume read the same whatever stage printed them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from trainers.errors import ConfigError


def resume_hint(checkpoint: str | os.PathLike | None) -> str:
    """Where a rerun of the same command resumes from (or that it starts over)."""
    if checkpoint is None:
        return "no checkpoint was saved yet, so a rerun starts from the beginning"
    return f"rerun the same command to resume from {checkpoint}"


def check_run_shape(saved: Mapping, current: Mapping, where: str | os.PathLike) -> None:
    """ConfigError naming the first key of ``current`` whose value differs from the checkpoint's ``saved``
    one: ZeRO states are partitioned per rank and step counters depend on batch sizes, so a checkpoint
    only resumes a run of the same shape."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise ConfigError(
                f"{where}: checkpoints were made with {key}={saved.get(key)}, this run has {value}; "
                "resuming needs the same (pass --fresh to start over)"
            )
