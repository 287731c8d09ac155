"""Pure logic of PPO's fault handling: the stop message and the engine-recovery loop (with the Ray parts replaced by recording fakes; no Ray started)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, RayActorError

from cluster.actor_group import ActorGroup
from cluster.liveness import lost_actor_id
from trainers.ppo import recovery

REPO = Path(__file__).resolve().parents[2]


def test_lost_actor_id_of_direct_and_unrelated_errors():
    assert lost_actor_id(RayActorError(actor_id="ab12")) == "ab12"
    assert lost_actor_id(ValueError("no actor")) is None


def test_stop_message_names_newest_complete_checkpoint(tmp_path):
    lost = recovery.ActorLost("policy", 1, "died (its process is gone)")
    root = tmp_path / "checkpoints"
    message = recovery.stop_message(lost, root, 0)
    assert message == (
        "policy rank 1 died (its process is gone) after iteration 0; every actor was stopped; "
        "no checkpoint was saved yet, so a rerun starts from the beginning"
    )
    for name in ("iter_000001", "iter_000002", "iter_000003.tmp"):  # .tmp: a save cut short
        (root / name).mkdir(parents=True)
    message = recovery.stop_message(lost, root, 2)
    assert f"resume from {root / 'iter_000002'}" in message and "after iteration 2;" in message
    assert "\n" not in message


class FakeHandle:
    def __init__(self, hex_id: str):
        self._actor_id = SimpleNamespace(hex=lambda: hex_id)


def fake_roles(max_restarts: int) -> SimpleNamespace:
    group = object.__new__(ActorGroup)
    group.actors = [FakeHandle("e0"), FakeHandle("e1")]
    roles = SimpleNamespace(rollout=group, engine_restarts=0, max_engine_restarts=max_restarts)
    roles.engines = lambda: group.actors
    return roles


def test_engine_recovery_pushes_weights_then_retries_the_whole_phase(monkeypatch):
    events: list = []
    monkeypatch.setattr(
        recovery, "recover_engine", lambda roles, rank, phase: events.append(("recover", rank))
    )
    monkeypatch.setattr(recovery, "push_policy_weights", lambda roles: events.append("push"))
    failures = [True, False]  # the first call loses engine 1

    def phase():
        events.append("call")
        if failures.pop(0):
            raise RayActorError(actor_id="e1")
        return "samples"

    assert recovery.with_engine_recovery(fake_roles(2), "generate", phase) == "samples"
    assert events == ["call", ("recover", 1), "push", "call"]

    events.clear()
    failures[:] = [True, False]
    assert recovery.with_engine_recovery(fake_roles(2), "sync", phase, push_first=False) == "samples"
    assert events == ["call", ("recover", 1), "call"]  # the phase is the push itself


def test_engine_recovery_reraises_errors_about_other_actors(monkeypatch):
    monkeypatch.setattr(recovery, "recover_engine", lambda *a: pytest.fail("not an engine"))

    def phase():
        raise ActorDiedError()  # no actor id: not one of the engines

    with pytest.raises(ActorDiedError):
        recovery.with_engine_recovery(fake_roles(2), "generate", phase)


def test_engine_loss_past_the_budget_stops_without_waiting():
    roles = fake_roles(1)
    roles.engine_restarts = 1
    with pytest.raises(
        recovery.ActorLost, match=r"rollout engine 0 was lost during generate .*max_engine_restarts=1"
    ):
        recovery.recover_engine(roles, 0, "generate")
    assert roles.engine_restarts == 2


def test_lost_actor_ignores_ordinary_errors_and_passes_actor_lost_through():
    lost = recovery.ActorLost("rollout", 0, "did not come back")
    assert recovery.lost_actor(SimpleNamespace(), lost) is lost
    assert recovery.lost_actor(SimpleNamespace(), ValueError("a bug")) is None
