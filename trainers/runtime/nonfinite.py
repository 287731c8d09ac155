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

Tests make chosen steps non-finite through ``RLHF_FAULT_NONFINITE_STEPS`` (``cluster/faults.py``).
"""

from __future__ import annotations

from collections.abc import Sequence


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
