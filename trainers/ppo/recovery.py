"""What the driver does when something is lost or goes non-finite (docs/design.md, "Reliability").

- A lost vLLM engine: Ray restarts it; the driver waits, pushes the current policy weights and reruns the
  whole phase with the same seeds (:func:`with_engine_recovery`), within ``ppo.max_engine_restarts``.
- A lost training rank (a rank of a torch.distributed world cannot be replaced): :func:`lost_actor` names
  it, the run stops with one line (:func:`lost_actor_message`).
- Non-finite optimizer steps: the streak per role is carried through the iterations and the run stops at
  ``ppo.max_nonfinite_steps`` in a row (:func:`check_nonfinite`).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.exceptions import RayActorError, RayError

from cluster.faults import NONFINITE_ENV, injector
from cluster.liveness import ActorGone, actor_id_of, lost_actor_id, probe_dead, wait_until_alive
from cluster.placement import bundle_nodes, node_names
from cluster.resources import format_resources
from trainers.errors import RunStopped
from trainers.ppo.checkpoint import DriverState, newest_checkpoint
from trainers.ppo.roles import Roles, push_policy_weights
from trainers.runs.resume import resume_hint
from trainers.runtime import nonfinite

ENGINE_RESTART_TIMEOUT_S = 900.0
"""How long the driver waits for a restarted vLLM engine to answer (start-up took 12-72 s on 2 CPU cores)."""


class ActorLost(Exception):
    """An actor the run cannot do without is gone: ``role``/``rank`` name it, ``detail`` says how."""

    def __init__(self, role: str, rank: int, detail: str):
        super().__init__(f"{'rollout engine' if role == 'rollout' else role + ' rank'} {rank} {detail}")
        self.role, self.rank, self.detail = role, rank, detail


def with_engine_recovery(roles: Roles, phase: str, call, push_first: bool = True):
    """``call()`` (one phase's calls to the engines and its ``ray.get``); if a rollout engine was lost on
    the way, wait for Ray's restart, push the current policy weights into the engines (a restarted engine
    loaded the SFT weights from disk) and run ``call()`` again, the whole phase with the same seeds.

    ``push_first=False`` when ``call`` is itself the weight push. Raises :class:`ActorLost` past
    ``ppo.max_engine_restarts`` or when the engine does not come back.
    """
    stale = False
    while True:
        try:
            if stale and push_first:
                push_policy_weights(roles)
            return call()
        except RayActorError as err:
            rank = roles.rollout.rank_of(lost_actor_id(err))
            if rank is None:
                raise
            recover_engine(roles, rank, phase)
            stale = True


def recover_engine(roles: Roles, rank: int, phase: str) -> None:
    """Count the loss of engine ``rank`` against the budget and wait until its restart answers."""
    roles.engine_restarts += 1
    budget = roles.max_engine_restarts
    if roles.engine_restarts > budget:
        raise ActorLost(
            "rollout", rank, f"was lost during {phase} with ppo.max_engine_restarts={budget} used up"
        )
    print(
        f"ppo: rollout engine {rank} lost during {phase}; restart {roles.engine_restarts}/{budget}: waiting "
        "for it, then pushing the current policy weights and retrying the phase",
        flush=True,
    )
    engine = roles.engines()[rank]
    placement = roles.placements["rollout"]
    start = time.monotonic()

    def still_waiting(waited: float) -> None:
        print(
            f"ppo: still waiting for rollout engine {rank} ({waited:.0f}s of {ENGINE_RESTART_TIMEOUT_S:.0f}s): "
            f"Ray restarts it once a node has {format_resources(placement.resources[rank])} for its "
            "placement bundle (a lost node's bundle moves to spare capacity or to a node the autoscaler adds)",
            flush=True,
        )

    try:
        wait_until_alive(lambda: engine.health.remote(), ENGINE_RESTART_TIMEOUT_S, notify=still_waiting)
    except ActorGone as err:
        raise ActorLost("rollout", rank, f"was lost during {phase} and did not come back: {err}") from None
    node = bundle_nodes(placement)[rank]
    print(
        f"ppo: rollout engine {rank} is back after {time.monotonic() - start:.1f}s on node "
        f"{node_names().get(node, node[:12])}",
        flush=True,
    )


def lost_actor(roles: Roles, err: BaseException) -> ActorLost | None:
    """The actor whose loss ``err`` comes from, if the run lost one (else None: an ordinary error).

    A lost rank of a torch.distributed world can surface as its own ``ActorDiedError`` or as a collective
    error in a surviving rank (``RayTaskError``); the latter is resolved by probing every training actor
    (and every reward-function worker).
    """
    if isinstance(err, ActorLost):
        return err
    if not isinstance(err, RayError):
        return None
    actors = roles.training_actors() | roles.function_actors()
    actor_id = lost_actor_id(err)
    found = [key for key, handle in actors.items() if actor_id and actor_id_of(handle) == actor_id]
    dead = found or probe_dead(actors)
    if not dead:
        return None
    role, rank = dead[0]
    return ActorLost(role, rank, "died (its process is gone)")


def lost_actor_message(lost: ActorLost, checkpoints: Path, completed: int) -> str:
    """The one line a stopped run prints: what was lost, after how many iterations, where a rerun of the
    same command resumes from."""
    resume = resume_hint(newest_checkpoint(checkpoints))
    return f"{lost} after iteration {completed}; every actor was stopped; {resume}"


def announce_poisoned_steps(first_step: int, count: int) -> dict[str, list[int]]:
    """Fault injection for tests (``cluster/faults.py``): print which of the ``count`` optimizer steps from
    run-wide step ``first_step`` on ``RLHF_FAULT_NONFINITE_STEPS`` makes non-finite, per role; returns
    their indices within those steps. Only a report: the training actors read the same variable (the
    driver forwards it to them) and poison those steps themselves."""
    faults = injector()
    out = {role: faults.nonfinite_in(role, first_step, count) for role in ("policy", "critic")}
    for role, idx in out.items():
        if idx:
            print(f"ppo: {NONFINITE_ENV} poisons {role} steps {[first_step + i for i in idx]}", flush=True)
    return out


def check_nonfinite(
    state: DriverState, skipped: dict[str, list[bool]], limit: int, checkpoints: Path
) -> None:
    """Carry each role's streak of skipped optimizer steps through this iteration (``state``), print a line
    when steps were skipped, and raise :class:`RunStopped` once a role has ``limit`` in a row -- before
    anything of this iteration is saved. The message names the newest complete checkpoint under
    ``checkpoints``."""
    longest = {}
    for role, flags in skipped.items():
        state.nonfinite_streak[role], longest[role] = nonfinite.update_streak(
            state.nonfinite_streak.get(role, 0), flags
        )
        if any(flags):
            print(
                f"ppo: iteration {state.iteration + 1}: {role} skipped {sum(flags)} of {len(flags)} optimizer "
                f"steps (non-finite loss or gradient; {state.nonfinite_streak[role]} in a row, stop at {limit})",
                flush=True,
            )
    worst = max(longest, key=lambda role: longest[role])
    if longest[worst] >= limit:
        resume = resume_hint(newest_checkpoint(checkpoints))
        what = f"ppo iteration {state.iteration + 1}, {worst}"
        raise RunStopped(nonfinite.stop_message(what, longest[worst], limit, resume))
