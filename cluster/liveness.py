"""Lost actors: which actor a Ray error is about, waiting for a restarted actor, probing for dead ones.

Ray reports a lost actor as a ``RayActorError``: ``ActorUnavailableError`` while it may come back (Ray is
restarting it), ``ActorDiedError`` once it is gone for good (no restarts left, or killed for good). A call
made *inside* another actor's task (the policy pushing weights into an engine) reaches the driver as a
``RayTaskError`` that is also an instance of that ``RayActorError`` and carries the same ``actor_id``, so
one ``isinstance`` check covers both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ActorGone(Exception):
    """An actor that did not come back: dead for good, or no answer within the time allowed."""


def lost_actor_id(err: BaseException) -> str | None:
    """Hex id of the actor a Ray error reports lost (directly or from inside another actor's task),
    else None."""
    from ray.exceptions import RayActorError

    return getattr(err, "actor_id", None) if isinstance(err, RayActorError) else None


def actor_id_of(handle: Any) -> str:
    """Hex id of an actor handle (what :func:`lost_actor_id` returns for it)."""
    return handle._actor_id.hex()


def wait_until_alive(
    ping: Callable[[], Any],
    timeout_s: float,
    poll_s: float = 0.5,
    dead_grace_s: float = 5.0,
    notify: Callable[[float], None] | None = None,
    every_s: float = 30.0,
) -> Any:
    """Call ``ping()`` (returns an ObjectRef of a cheap actor method) until it answers; return the answer.

    While Ray restarts the actor, calls fail at once with ``ActorUnavailableError``; they are retried every
    ``poll_s``. ``ActorDiedError`` means no restart is coming, but is only believed after ``dead_grace_s``
    of nothing else (the first error after a crash can race the restart). Raises :class:`ActorGone`.
    ``notify(seconds waited)`` is called every ``every_s`` while no answer came (a restart that waits for a
    node to come back can take minutes).
    """
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

    start = time.monotonic()
    dead_since: float | None = None
    told = start
    while True:
        now = time.monotonic()
        left = timeout_s - (now - start)
        if left <= 0:
            raise ActorGone(f"no answer within {timeout_s:.0f}s")
        if notify is not None and now - told >= every_s:
            told = now
            notify(now - start)
        try:
            return ray.get(ping(), timeout=min(left, every_s) if notify is not None else left)
        except GetTimeoutError:
            continue  # the loop head reports the timeout
        except RayActorError as err:
            now = time.monotonic()
            if isinstance(err, ActorDiedError):
                dead_since = dead_since if dead_since is not None else now
                if now - dead_since >= dead_grace_s:
                    raise ActorGone("dead for good (no restart left)") from None
            else:
                dead_since = None
        time.sleep(poll_s)


def probe_dead(handles: dict[Any, Any], timeout_s: float = 10.0) -> list[Any]:
    """Keys of ``handles`` (key -> actor handle) whose actor is dead for good.

    Uses Ray's built-in ``__ray_ready__``: a dead actor fails it at once; a live one that is busy (e.g.
    blocked in a collective with the dead one) does not answer within ``timeout_s`` and counts as alive.
    """
    import ray
    from ray.exceptions import ActorDiedError

    refs = {handle.__ray_ready__.remote(): key for key, handle in handles.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    dead = []
    for ref in ready:
        try:
            ray.get(ref)
        except ActorDiedError:
            dead.append(refs[ref])
    return [key for key in handles if key in dead]
