"""A stage's checkpoints: what one holds, which one a rerun resumes from, saving and restoring.

A checkpoint is one Ray Train checkpoint directory (``OUT/checkpoints/<stage>/step_0000042``), with
the DeepSpeed state under the tag :data:`CHECKPOINT_TAG` (weights, AdamW state, LR schedule), each rank's
torch RNG state (``rng_rank<r>.pt``) and, from rank 0, :data:`TRAINER_STATE_FILE`: the run shape and the
:class:`LoopState` counters. Restoring all of it (:func:`restore_checkpoint`) continues exactly where the
uninterrupted run would be: the step counter fixes the epoch and the position in it, since the data
order is a function of seed and epoch (:mod:`trainers.stages.batching`).

Which checkpoint a rerun resumes from is Ray Train's choice, the one its checkpoint manager registered
(:func:`newest_checkpoint`); the driver reads it before starting to refuse a checkpoint of another run
shape (:func:`check_resumable`) and to say where it resumes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint

from trainers.files import atomic_write_json
from trainers.runs.resume import check_run_shape
from trainers.runtime.zero import CHECKPOINT_TAG
from trainers.stages.plan import StagePlan

TRAINER_STATE_FILE = "trainer_state.json"
"""Step counters and run shape, next to the DeepSpeed files of a checkpoint."""
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's record of its registered checkpoints, in the run directory (names the one it restores)."""


@dataclass
class LoopState:
    """Counters that a checkpoint saves and a resume restores."""

    step: int = 0
    """Optimizer steps done."""
    recent_losses: list = field(default_factory=list)
    """Losses of the last TRAIN_LOSS_WINDOW steps (for the summary's train_loss)."""
    tokens_per_s: list = field(default_factory=list)
    """Recent throughput values."""
    last_valid: dict = field(default_factory=dict)
    """Validation metrics of the latest evaluation."""
    last_checkpoint_step: int = -1
    resumed_from_step: int | None = None
    nonfinite_streak: int = 0
    """Optimizer steps skipped in a row (non-finite loss or gradient) up to ``step``."""
    skipped_steps: int = 0
    """Optimizer steps skipped so far in the run."""


# --------------------------------------------------------------------------------------------------
# Driver side: which checkpoint a rerun resumes from
# --------------------------------------------------------------------------------------------------


def newest_checkpoint(storage: Path) -> Path | None:
    """The checkpoint a rerun resumes from, under a Ray Train run directory (None: a rerun starts over).

    That is the newest checkpoint Ray Train's checkpoint manager registered, named in its snapshot
    file -- Ray Train restores from nothing else. It is not simply the highest step on disk: the
    controller registers a reported checkpoint only when it next polls (every 2 s), and workers that
    outlive a SIGKILLed driver for a few seconds can still write checkpoint folders nobody registers
    (seen: folders up to step 6, resumed from step 2; folders up to step 4 and no snapshot yet: the rerun
    started over). Such folders are ignored, and overwritten when the rerun reaches their step.
    """
    try:
        latest = json.loads((storage / SNAPSHOT_FILE).read_text()).get("latest_checkpoint_result") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    name = latest.get("checkpoint_dir_name")
    return storage / name if name and (storage / name / TRAINER_STATE_FILE).is_file() else None


def latest_checkpoint_state(storage: Path) -> dict | None:
    """The trainer state of the checkpoint a rerun resumes from (:func:`newest_checkpoint`), or None."""
    path = newest_checkpoint(storage)
    try:
        return json.loads((path / TRAINER_STATE_FILE).read_text()) if path else None
    except (OSError, json.JSONDecodeError):
        return None


def check_resumable(state: dict | None, plan: StagePlan) -> None:
    """ConfigError if a checkpoint exists but was made with another run shape (use --fresh)."""
    if state is None:
        return
    check_run_shape(state, plan.run_shape(), str(plan.out_dir))


# --------------------------------------------------------------------------------------------------
# Worker side: save and restore
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's torch RNG states (CPU, and CUDA when present): dropout's randomness."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(saved: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(saved["cpu"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def restore_checkpoint(model, rank: int) -> LoopState:
    """Load the newest Ray Train checkpoint into the DeepSpeed ``model`` (weights, AdamW state, LR
    schedule) and this rank's RNG; its counters, or fresh ones when there is no checkpoint."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as path:
        loaded, _ = model.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if loaded is None:  # DeepSpeed returns (None, None) instead of raising when nothing matched
            raise RuntimeError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' in {path}")
        saved = json.loads((Path(path) / TRAINER_STATE_FILE).read_text())
        set_rng_state(torch.load(Path(path) / f"rng_rank{rank}.pt", weights_only=False))
    state = LoopState(**saved["loop"])
    state.resumed_from_step = state.step
    return state


def report(metrics: dict, checkpoint: Checkpoint | None = None, name: str | None = None) -> None:
    """``ray.train.report`` of ``metrics`` (a copy), with a checkpoint directory of that name if given."""
    ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)


def save_checkpoint(model, plan: StagePlan, state: LoopState, metrics: dict, rank: int) -> None:
    """DeepSpeed state + loop counters + RNG into a temp dir, reported as a Ray Train checkpoint."""
    with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
        model.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        state.last_checkpoint_step = state.step
        if rank == 0:
            loop = {
                k: v for k, v in vars(state).items() if not k.startswith("_") and k != "resumed_from_step"
            }
            saved = {"stage": plan.stage, **plan.run_shape(), "step": state.step, "loop": loop}
            atomic_write_json(Path(tmp) / TRAINER_STATE_FILE, saved)
        report(metrics, Checkpoint.from_directory(tmp), name=f"step_{state.step:07d}")
