"""Non-finite optimizer steps: the pure bookkeeping shared by the PPO driver and the Ray Train stages.

An optimizer step whose loss (on any rank) or global gradient norm is NaN/inf is *skipped*: the
weights, the optimizer moments and the LR schedule stay as they were (``trainers.runtime.step_guard.StepGuard``
does that inside each rank). The drivers count skipped steps and keep a *streak* -- skipped steps
in a row, across iterations/epochs -- and stop the run (``trainers.errors.RunStopped``) once it
reaches ``max_nonfinite_steps``, before anything is saved after the bad steps.

The streak is part of the saved state (PPO ``DriverState.nonfinite_streak``, the stages'
``LoopState.nonfinite_streak``): a checkpoint taken after a skipped step holds exactly the weights of
the last applied step (a skipped step changes nothing) plus the streak so far, so a resumed run
stops at the same step as the uninterrupted run would.

Fault injection (tests only). The environment variable ``RLHF_FAULT_NONFINITE_STEPS`` of the driver
process makes chosen optimizer steps non-finite, without any code change::

    RLHF_FAULT_NONFINITE_STEPS="policy:2,3;critic:6"   # PPO: policy steps 2 and 3, critic step 6
    RLHF_FAULT_NONFINITE_STEPS="sft:4-6"               # SFT steps 4, 5 and 6

Steps are 1-based optimizer-step numbers of that role counted from the start of the run (PPO: over
all iterations). The driver reads the variable and hands the poisoned steps to the workers, which add
NaN to rank 0's loss of that step (``loss + nan`` keeps the gradients finite, so only the all-ranks
loss check can catch it -- the harder case). The stages also take ``run_stage(...,
nonfinite_at_steps=[...])`` from Python, like their ``fail_at_step`` hook. Nothing else sets it; a
malformed value is an error, and the driver prints a line saying the fault is armed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

FAULT_ENV = "RLHF_FAULT_NONFINITE_STEPS"
"""Environment variable naming the optimizer steps to poison (module docstring); tests only."""

FAULT_ROLES = ("policy", "critic", "pretrain", "sft", "rm")
"""Who can be poisoned: the PPO training roles and the Ray Train stages."""
_ITEM_RE = re.compile(r"^\s*([a-z_]+)\s*:\s*([0-9,\s-]+)$")


def parse_fault_steps(text: str | None) -> dict[str, frozenset[int]]:
    """``"policy:2,3;critic:6-7"`` -> ``{"policy": {2, 3}, "critic": {6, 7}}``; empty for None/"".

    Raises ``ValueError`` on anything else (a typo must not silently disarm a test's fault).
    """
    out: dict[str, set[int]] = {}
    for item in filter(str.strip, (text or "").split(";")):
        match = _ITEM_RE.match(item)
        if not match:
            raise ValueError(f"{FAULT_ENV}: cannot parse '{item}' (expected ROLE:N[,N|N-M...])")
        role, spec = match.groups()
        if role not in FAULT_ROLES:
            raise ValueError(f"{FAULT_ENV}: unknown role '{role}' (one of {', '.join(FAULT_ROLES)})")
        for part in filter(str.strip, spec.split(",")):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 1 or last < first:
                raise ValueError(f"{FAULT_ENV}: bad step range '{part.strip()}' for {role}")
            out.setdefault(role, set()).update(range(first, last + 1))
    return {role: frozenset(steps) for role, steps in out.items()}


def fault_steps_from_env(role: str, environ: Mapping[str, str] = os.environ) -> frozenset[int]:
    """The poisoned steps of ``role`` from :data:`FAULT_ENV` (empty when unset)."""
    return parse_fault_steps(environ.get(FAULT_ENV)).get(role, frozenset())


def local_indices(poisoned: Iterable[int], first_step: int, count: int) -> list[int]:
    """0-based indices, within a call running steps ``first_step .. first_step + count - 1`` (1-based
    run-wide numbers), of the poisoned steps that fall in it."""
    return sorted(s - first_step for s in poisoned if first_step <= s < first_step + count)


def update_streak(streak: int, skipped: Sequence[bool]) -> tuple[int, int]:
    """Carry the run's streak of skipped steps through ``skipped`` (one flag per step, in order).

    Returns ``(streak after the last step, longest streak seen, counting the one carried in)``; the
    longest one decides stopping, since a streak can reach the limit in the middle of an iteration
    and be broken by its last step.
    """
    longest = streak
    for bad in skipped:
        streak = streak + 1 if bad else 0
        longest = max(longest, streak)
    return streak, longest


def stop_message(what: str, longest: int, limit: int, resume: str) -> str:
    """The one line a run stops with: what went wrong, the limit, where a rerun resumes from."""
    return (
        f"{what}: {longest} optimizer steps in a row had a non-finite loss or gradient norm (limit "
        f"max_nonfinite_steps={limit}); they were skipped and nothing was saved after them; {resume}"
    )


def resume_hint(checkpoint: str | os.PathLike | None) -> str:
    """Where a rerun of the same command resumes from (or that it starts over)."""
    if checkpoint is None:
        return "no checkpoint was saved yet, so a rerun starts from the beginning"
    return f"rerun the same command to resume from {checkpoint}"
