"""The run directory every stage writes: metrics, summary, TensorBoard events, progress lines.

Layout of a stage's output directory ``OUT`` (DESIGN.md, "Outputs")::

    OUT/model/            Hugging Face save_pretrained (safetensors + tokenizer), written atomically
    OUT/metrics.jsonl     one JSON object per logged step ({"step": 3, "epoch": 0, "loss": ...})
    OUT/summary.json      final metrics + wall time
    OUT/config.yaml       the resolved configuration the run used
    OUT/checkpoints/      resumable state (Ray Train storage)
    OUT/tensorboard/      TensorBoard events (torch.utils.tensorboard)

Files that a reader may open at any moment (summary, config, the model directory) are written to a
temporary name beside the target and renamed into place, so a crash never leaves half a file.
``metrics.jsonl`` is append-only (one flushed line per step); on resume it is cut back to the
checkpoint's step so a step never appears twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainers.errors import ConfigError
from trainers.files import atomic_write_text, jsonable


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


def format_number(value: Any) -> str:
    """Compact human form for progress lines: 4 significant digits, integers as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def progress_line(stage: str, step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``"sft step 12/300 loss 2.31 tokens/s 9,812 lr 9.8e-05"``: the line printed while a stage runs."""
    parts = [f"{stage} step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {format_number(metrics['loss'])}")
    if "tokens_per_s" in metrics:
        parts.append(f"tokens/s {float(metrics['tokens_per_s']):,.0f}")
    for key in ("accuracy", "valid_loss", "valid_accuracy", "lr", "grad_norm"):
        if key in metrics:
            parts.append(f"{key} {format_number(metrics[key])}")
    return " ".join(parts)


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to TensorBoard and,
    when ``logging.wandb_project`` is set, to Weights & Biases (:mod:`trainers.wandb_log`).

    Only one process (rank 0) writes. Each line is flushed at once so ``tail -f`` and a crash both
    see every completed step. TensorBoard and W&B get every numeric value as ``<prefix>/<key>``.
    ``logging_cfg`` is the ``logging`` config section (dataclass or dict); ``run_config`` (the resolved
    config as a dict) becomes the W&B run's config after :func:`redact`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str,
        tensorboard: bool = True,
        logging_cfg: Any = None,
        run_config: Mapping | None = None,
    ):
        from trainers.wandb_log import open_wandb

        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._wandb = open_wandb(logging_cfg, out_dir, run_config)  # None (and no import) when unset
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def scalars(self, record: Mapping[str, Any]) -> dict[str, float]:
        """``{"<prefix>/<key>": value}`` for the numeric values of a record (not ``step``, not bools)."""
        return {
            f"{self.prefix}/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write ``{"step": step, **metrics}`` as one line (and TensorBoard/W&B scalars); return the record."""
        record = jsonable({"step": int(step), **metrics})
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        scalars = self.scalars(record)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(int(step), scalars)
        return record

    def close(self) -> None:
        """Flush and close every sink (and finish the W&B run)."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


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
    """All records of a ``metrics.jsonl`` file, in order (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_output(out: Path, cfg, fresh: bool) -> None:
    """Create a stage's output directory (call only after validation passed) and write the resolved
    ``config.yaml``; ``fresh`` removes an earlier run's checkpoints, logs, metrics and summary."""
    from trainers.config import dump_yaml

    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))  # redacted: never a credential
