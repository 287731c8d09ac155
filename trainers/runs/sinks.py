"""Where metrics go besides ``metrics.jsonl``: TensorBoard and (optionally) Weights & Biases.

:func:`open_sinks` is the one factory: :class:`~trainers.runs.metrics.MetricsWriter` (rank 0 of every
stage, and the PPO driver) sends each record's scalars, named ``<prefix>/<key>``, to every sink it gets.

    rlhf sft ... logging.wandb_project=my-rlhf                          # online
    rlhf demo logging.wandb_project=my-rlhf logging.wandb_mode=offline  # OUT/<stage>/wandb/, `wandb sync` later

W&B decisions:

- **Lazy**: ``wandb`` is imported only when a project is set (it is an optional extra,
  ``pip install -e '.[wandb]'``); with no project nothing here touches it.
- **Checked before any work**: :func:`check_wandb` (called from ``Config.validate``) turns a missing
  package into a one-line :class:`~trainers.errors.ConfigError`; looking the package up does not
  import it, so the check is cheap.
- **One run per output directory and process**, named after the directory (``demo/ppo``), with the
  resolved, redacted config as the run config -- nothing else (no environment variables); local files go
  to ``OUT/wandb/``, beside ``OUT/tensorboard/``. A resumed stage starts a new run of the same name: the
  resumed steps repeat the checkpoint's step numbers, which one W&B run would refuse (steps only grow).
- **Same scalars as TensorBoard**: non-finite values are already ``None`` in the record and are left out.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from trainers.errors import ConfigError
from trainers.redact import redact

MISSING_PACKAGE = (
    "logging.wandb_project is set but the wandb package is not installed; pip install wandb or unset it"
)


class Sink(Protocol):
    """Something a metrics record's scalars are sent to."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class LoggingSettings(Protocol):
    """What :func:`open_sinks` reads: the ``logging`` config section (``trainers.config.LoggingConfig``)."""

    tensorboard: bool
    wandb_project: str | None
    wandb_mode: str


class TensorBoardSink:
    """TensorBoard events in ``OUT/tensorboard/`` (``torch.utils.tensorboard``, imported only when used)."""

    def __init__(self, out_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_importable() -> bool:
    """Whether ``import wandb`` can find the package, without importing it. A ``None`` entry in
    ``sys.modules`` blocks an import (Python's own convention), so it counts as missing."""
    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    return importlib.util.find_spec("wandb") is not None


def check_wandb(project: str | None) -> None:
    """ConfigError (one line) if a W&B project is set but the package is missing; call before any work."""
    if project and not wandb_importable():
        raise ConfigError(MISSING_PACKAGE)


def import_wandb():
    """The ``wandb`` module; ConfigError if it cannot be imported (missing or blocked)."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ConfigError(MISSING_PACKAGE) from None


def run_name(out_dir: str | Path) -> str | None:
    """``parent/name`` of the output directory (``/tmp/demo/ppo`` -> ``demo/ppo``): the stage and the
    run it belongs to, which is what tells W&B runs of one project apart. None for ``/`` (W&B then
    picks a name)."""
    out = Path(out_dir).expanduser().resolve()
    return "/".join(part for part in (out.parent.name, out.name) if part) or None


class WandbSink:
    """One W&B run: ``init`` here, :meth:`log` per record, :meth:`close` finishes the run."""

    def __init__(self, project: str, mode: str, out_dir: str | Path, config: Mapping | None = None):
        wandb = import_wandb()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        # dir=OUT: wandb writes its run files to OUT/wandb/, not to the cwd (a trial folder in Ray Train)
        self._run = wandb.init(
            project=project, mode=mode, name=run_name(out_dir), config=dict(config or {}), dir=str(out_dir)
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=int(step))

    def close(self) -> None:
        self._run.finish()


def open_sinks(
    out_dir: str | Path, logging: LoggingSettings, run_config: Mapping | None = None
) -> list[Sink]:
    """The sinks ``logging`` asks for: TensorBoard when ``logging.tensorboard``, a W&B run when
    ``logging.wandb_project`` is set (with ``run_config`` redacted: whoever reads the project sees it)."""
    sinks: list[Sink] = []
    if logging.wandb_project:
        config = redact(run_config) if run_config else None
        sinks.append(WandbSink(logging.wandb_project, logging.wandb_mode, out_dir, config))
    if logging.tensorboard:
        sinks.append(TensorBoardSink(out_dir))
    return sinks
