"""PPO checkpoints: ``OUT/checkpoints/iter_NNNNNN/{policy,critic,driver_state.json}``.

The driver state (:class:`DriverState`) holds counters only -- every random choice derives from the seed
and the iteration -- plus the run shape a resumed run must share. A checkpoint is written under
``iter_NNNNNN.tmp`` and renamed once complete; the newest complete one is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import ray

from trainers.config import Config
from trainers.files import atomic_write_json
from trainers.ppo.roles import Roles
from trainers.runs.resume import check_run_shape

_CKPT_RE = re.compile(r"^iter_(\d{6,})$")


def checkpoint_name(iteration: int) -> str:
    """``iter_NNNNNN``: the checkpoint taken after ``iteration`` iterations."""
    return f"iter_{iteration:06d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first. A checkpoint is complete once renamed from its
    ``.tmp`` name, which happens after everything in it was written."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, None if there is none."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resume_point(root: str | os.PathLike, fresh: bool) -> Path | None:
    """The checkpoint a run resumes from: the newest complete one under ``root``; None with ``fresh``
    (``rlhf ppo --fresh`` starts over; ``trainers.runs.outdir.prepare_output`` then deletes the old ones)."""
    return None if fresh else newest_checkpoint(root)


def rotate_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints and any leftover ``.tmp`` directory;
    returns what was deleted."""
    root = Path(root)
    doomed = complete_checkpoints(root)[:-keep] if keep > 0 else complete_checkpoints(root)
    doomed += [p for p in root.glob("iter_*.tmp") if p.is_dir()] if root.is_dir() else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


DRIVER_STATE_FILE = "driver_state.json"
"""Driver part of a checkpoint: iteration, KL controller, data positions, run shape."""


@dataclass
class DriverState:
    """Everything the driver needs to continue a run exactly; saved in every checkpoint.

    Every random choice (prompt order, minibatch order, sampling seeds) is derived from the config seed
    and the iteration (:func:`derived_seed`), so these counters are the whole of the driver's RNG state.
    """

    iteration: int = 0
    """Iterations completed."""
    prompt_position: int = 0
    """Prompts consumed so far (position in the endless shuffled prompt stream, :func:`take_rows`)."""
    ptx_position: int = 0
    """Pretraining windows consumed so far."""
    kl_controller: dict = field(default_factory=dict)
    """The KL controller's ``state_dict`` (its current coefficient)."""
    shape: dict = field(default_factory=dict)
    """:func:`run_shape` of the run that wrote the checkpoint."""
    nonfinite_streak: dict = field(default_factory=dict)
    """Per training role (``policy``, ``critic``): optimizer steps skipped in a row (non-finite loss or
    gradient) up to the end of the last iteration. Saved, so a resumed run stops where an uninterrupted
    one would (``trainers.runtime.nonfinite``)."""


def run_shape(cfg: Config) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: DeepSpeed ZeRO-3 states are
    partitioned per rank, and the KL controller state is of one kind."""
    p = cfg.ppo
    return {
        "policy_workers": p.policy_workers,
        "critic_workers": p.critic_workers if p.advantage == "gae" else 0,
        "zero_stage": p.zero_stage,
        "kl_controller": "adaptive" if p.adaptive_kl else "fixed",
    }


def check_resumable(checkpoint: Path | None, cfg: Config) -> None:
    """ConfigError (before any actor starts) if the newest checkpoint was made with another run shape."""
    if checkpoint is None:
        return
    saved = json.loads((checkpoint / DRIVER_STATE_FILE).read_text()).get("shape", {})
    check_run_shape(saved, run_shape(cfg), checkpoint)


def trained_actors(roles: Roles) -> list[tuple[str, object]]:
    """``(role, actor)`` of every rank whose state a checkpoint holds: the policy and, with GAE, the critic."""
    groups = {"policy": roles.policy, "critic": roles.critic}
    return [(role, a) for role, group in groups.items() if group is not None for a in group.actors]


def save_checkpoint(roles: Roles, root: Path, state: DriverState, keep: int) -> Path:
    """``root/iter_NNNNNN``: policy and critic DeepSpeed states (every rank writes its part) and the
    driver state, written under ``.tmp`` and renamed when complete; older ones rotated away."""
    final = root / checkpoint_name(state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get([a.save_state.remote(str(tmp / role)) for role, a in trained_actors(roles)])
    atomic_write_json(tmp / DRIVER_STATE_FILE, dataclasses.asdict(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate_checkpoints(root, keep)
    return final


def load_checkpoint(roles: Roles, path: Path) -> DriverState:
    """Restore policy and critic (weights, AdamW, schedule) and the driver state from ``path``."""
    ray.get([a.load_state.remote(str(path / role)) for role, a in trained_actors(roles)])
    return DriverState(**json.loads((path / DRIVER_STATE_FILE).read_text()))
