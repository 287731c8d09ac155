"""Optional Weights & Biases logging, next to ``metrics.jsonl`` and TensorBoard.

Off unless ``logging.wandb_project`` is set; then every :class:`~trainers.outputs.MetricsWriter`
(rank 0 of every stage, and the PPO driver) also sends its scalars to one W&B run::

    rlhf sft ... logging.wandb_project=my-rlhf                          # online
    rlhf demo logging.wandb_project=my-rlhf logging.wandb_mode=offline  # OUT/<stage>/wandb/, `wandb sync` later

Decisions:

- **Lazy**: ``wandb`` is imported only when a project is set (it is an optional extra,
  ``pip install -e '.[wandb]'``); with no project nothing here touches it.
- **Checked before any work**: :func:`check_wandb` (called from config validation) turns a missing
  package into a one-line :class:`~trainers.errors.ConfigError`; looking the package up does not
  import it, so the check is cheap.
- **One run per output directory and process**, named after the directory (``demo/ppo``), with the
  resolved config as the run config — nothing else (no environment variables); local files go to
  ``OUT/wandb/``, beside ``OUT/tensorboard/``. A resumed stage starts a new run of the same name: the
  resumed steps repeat the checkpoint's step numbers, which one W&B run would refuse (steps only grow).
- **Same scalars as TensorBoard**: ``<prefix>/<key>`` for every numeric value of a record, at the
  record's step; non-finite values are already ``None`` in the record and are left out, as in
  TensorBoard.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainers.errors import ConfigError

MISSING_PACKAGE = (
    "logging.wandb_project is set but the wandb package is not installed; pip install wandb or unset it"
)


def setting(logging_cfg: Any, key: str, default: Any = None) -> Any:
    """``key`` of the ``logging`` config section, given as the dataclass or as a dict (Ray Train
    workers get the plan's dict); ``default`` when absent or when no section is given."""
    if logging_cfg is None:
        return default
    if isinstance(logging_cfg, Mapping):
        return logging_cfg.get(key, default)
    return getattr(logging_cfg, key, default)


def wandb_enabled(logging_cfg: Any) -> bool:
    """True when ``logging.wandb_project`` names a project (None or empty: off)."""
    return bool(setting(logging_cfg, "wandb_project"))


def wandb_importable() -> bool:
    """Whether ``import wandb`` can find the package, without importing it. A ``None`` entry in
    ``sys.modules`` blocks an import (Python's own convention), so it counts as missing."""
    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    return importlib.util.find_spec("wandb") is not None


def check_wandb(logging_cfg: Any) -> None:
    """ConfigError (one line) if W&B is configured but the package is missing; call before any work."""
    if wandb_enabled(logging_cfg) and not wandb_importable():
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


class WandbRun:
    """One W&B run: ``init`` once here, :meth:`log` per step, :meth:`finish` at the end."""

    def __init__(self, project: str, mode: str, out_dir: str | Path, config: Mapping | None = None):
        wandb = import_wandb()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        # dir=OUT: wandb writes its run files to OUT/wandb/, not to the cwd (a trial folder in Ray Train)
        self._run = wandb.init(
            project=project, mode=mode, name=run_name(out_dir), config=dict(config or {}), dir=str(out_dir)
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Send one step's scalars (already named ``<prefix>/<key>``)."""
        self._run.log(dict(metrics), step=int(step))

    def finish(self) -> None:
        """Close the run (uploads what is left when online)."""
        self._run.finish()


def open_wandb(logging_cfg: Any, out_dir: str | Path, config: Mapping | None = None) -> WandbRun | None:
    """A :class:`WandbRun` for ``out_dir`` when ``logging.wandb_project`` is set; else None, and
    ``wandb`` is not imported."""
    if not wandb_enabled(logging_cfg):
        return None
    from trainers.redact import redact

    mode = setting(logging_cfg, "wandb_mode", "online")
    # The run config is shared with whoever reads the project: never a credential.
    return WandbRun(setting(logging_cfg, "wandb_project"), mode, out_dir, redact(config) if config else None)
