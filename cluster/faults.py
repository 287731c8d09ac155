"""Fault injection for tests: one injector, read from ``RLHF_FAULT_*`` environment variables.

Nothing fires unless a variable is set, and production code takes no fault arguments: a process asks
:func:`injector` (its own environment) at the few places where a crash or a bad number is interesting.
Drivers forward the variables to their actors and Ray Train workers (:func:`fault_env`): Ray workers do
not see environment variables set after the cluster started.

- ``RLHF_FAULT_KILL_ENGINE="<point>@<marker>;..."``: a vLLM engine reaching ``<point>``
  (``generate:<request seed>``, ``weights:<k>`` = loading the k-th weight update it received) creates the
  marker file and exits at once with ``os._exit(1)`` -- no clean-up, as a segfault or the OOM killer would
  leave it. The marker makes each entry fire once: a restarted engine passing the same point carries on.
- ``RLHF_FAULT_NONFINITE_STEPS="policy:2,3;critic:6"`` / ``"sft:4-6"``: those optimizer steps of the role
  (1-based, counted over the whole run; PPO: over all iterations) get a NaN added to rank 0's loss. The
  gradients stay finite (``loss + nan``), so only the all-ranks loss check can catch it -- the harder case.
- ``RLHF_FAULT_FAIL_AFTER_STEP="sft:3"``: every worker of that stage raises right after that optimizer step
  (and its checkpoint, if one is due) unless the run resumed from a checkpoint: a worker failure that Ray
  Train's ``max_failures`` restarts from the newest checkpoint.

A malformed value is an error (a typo must not silently disarm a test's fault).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

FAULT_PREFIX = "RLHF_FAULT_"
KILL_ENGINE_ENV = "RLHF_FAULT_KILL_ENGINE"
NONFINITE_ENV = "RLHF_FAULT_NONFINITE_STEPS"
FAIL_AFTER_ENV = "RLHF_FAULT_FAIL_AFTER_STEP"
FAULT_ROLES = ("policy", "critic", "pretrain", "sft", "rm")
"""Who can get non-finite steps: the PPO training roles and the Ray Train stages."""
STAGES = ("pretrain", "sft", "rm")
_ITEM_RE = re.compile(r"^\s*([a-z_]+)\s*:\s*([0-9,\s-]+)$")


def parse_kill_spec(value: str) -> tuple[tuple[str, str], ...]:
    """``"<point>@<marker>;..."`` -> ``((point, marker), ...)``; ValueError for an entry without ``@``."""
    entries = []
    for entry in filter(None, (part.strip() for part in value.split(";"))):
        point, sep, marker = entry.partition("@")
        if not sep or not point or not marker:
            raise ValueError(f"fault entry '{entry}' is not '<point>@<marker path>'")
        entries.append((point, marker))
    return tuple(entries)


def parse_fault_steps(text: str | None, variable: str = NONFINITE_ENV) -> dict[str, frozenset[int]]:
    """``"policy:2,3;critic:6-7"`` -> ``{"policy": {2, 3}, "critic": {6, 7}}``; empty for None/""."""
    out: dict[str, set[int]] = {}
    for item in filter(str.strip, (text or "").split(";")):
        match = _ITEM_RE.match(item)
        if not match:
            raise ValueError(f"{variable}: cannot parse '{item}' (expected ROLE:N[,N|N-M...])")
        role, spec = match.groups()
        if role not in FAULT_ROLES:
            raise ValueError(f"{variable}: unknown role '{role}' (one of {', '.join(FAULT_ROLES)})")
        for part in filter(str.strip, spec.split(",")):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 1 or last < first:
                raise ValueError(f"{variable}: bad step range '{part.strip()}' for {role}")
            out.setdefault(role, set()).update(range(first, last + 1))
    return {role: frozenset(steps) for role, steps in out.items()}


def parse_fail_after(text: str | None) -> dict[str, int]:
    """``"sft:3"`` -> ``{"sft": 3}``: the step after which a stage's workers fail (stages only)."""
    out = {}
    for stage, steps in parse_fault_steps(text, FAIL_AFTER_ENV).items():
        if stage not in STAGES or len(steps) != 1:
            raise ValueError(f"{FAIL_AFTER_ENV}: expected STAGE:N with STAGE one of {', '.join(STAGES)}")
        out[stage] = next(iter(steps))
    return out


@dataclasses.dataclass(frozen=True)
class FaultInjector:
    """The faults this process was asked for (module docstring); inert when built from an empty environment."""

    kill_engine: tuple[tuple[str, str], ...] = ()
    """``(point, marker path)`` entries of :data:`KILL_ENGINE_ENV`."""
    nonfinite_steps: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    """Role -> 1-based run-wide optimizer steps whose loss gets a NaN (:data:`NONFINITE_ENV`)."""
    fail_after: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Stage -> the optimizer step after which its workers raise (:data:`FAIL_AFTER_ENV`)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultInjector:
        environ = os.environ if environ is None else environ
        return cls(
            kill_engine=parse_kill_spec(environ.get(KILL_ENGINE_ENV, "")),
            nonfinite_steps=parse_fault_steps(environ.get(NONFINITE_ENV)),
            fail_after=parse_fail_after(environ.get(FAIL_AFTER_ENV)),
        )

    def kill_engine_at(self, point: str) -> None:
        """Exit this process at once if an entry names ``point`` and its marker does not exist yet.

        Creating the marker with ``O_EXCL`` first means that, of several processes reaching the point, one
        crashes; a restarted process finds the marker and goes on.
        """
        for name, marker in self.kill_engine:
            if name != point:
                continue
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            print(f"fault injection: {KILL_ENGINE_ENV} point {point}: exiting", flush=True)
            os._exit(1)

    def nonfinite(self, role: str, step: int) -> bool:
        """Whether run-wide optimizer step ``step`` (1-based) of ``role`` is to be made non-finite."""
        return step in self.nonfinite_steps.get(role, ())

    def nonfinite_in(self, role: str, first_step: int, count: int) -> list[int]:
        """0-based indices, within ``count`` steps starting at run-wide step ``first_step`` (1-based), of
        the steps of ``role`` to make non-finite."""
        return [i for i in range(count) if self.nonfinite(role, first_step + i)]

    def fails_after(self, stage: str, step: int) -> bool:
        """Whether a stage's workers are to raise right after optimizer step ``step``."""
        return self.fail_after.get(stage) == step


def injector() -> FaultInjector:
    """The faults this process's environment asks for (read on every call: tests set variables late)."""
    return FaultInjector.from_env()


def fault_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``RLHF_FAULT_*`` variables of ``environ`` (default: this process) to forward to actors."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FAULT_PREFIX)}
