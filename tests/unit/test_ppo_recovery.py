"""trainers/ppo/recovery.py: the stop messages, the engine-recovery loop (the Ray parts replaced by
recording fakes; no Ray started), lost training ranks, non-finite streaks and the fault-injection report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, RayActorError

from actors.critic import CriticWorker
from actors.policy import PolicyWorker
from cluster.actor_group import ActorGroup
from cluster.faults import NONFINITE_ENV as FAULT_ENV
from cluster.liveness import lost_actor_id
from trainers.errors import RunStopped
from trainers.ppo import checkpoint, recovery


def test_lost_actor_id_of_direct_and_unrelated_errors():
    assert lost_actor_id(RayActorError(actor_id="ab12")) == "ab12"
    assert lost_actor_id(ValueError("no actor")) is None


def test_lost_actor_message_names_newest_complete_checkpoint(tmp_path):
    lost = recovery.ActorLost("policy", 1, "died (its process is gone)")
    root = tmp_path / "checkpoints"
    message = recovery.lost_actor_message(lost, root, 0)
    assert message == (
        "policy rank 1 died (its process is gone) after iteration 0; every actor was stopped; "
        "no checkpoint was saved yet, so a rerun starts from the beginning"
    )
    for name in ("iter_000001", "iter_000002", "iter_000003.tmp"):  # .tmp: a save cut short
        (root / name).mkdir(parents=True)
    message = recovery.lost_actor_message(lost, root, 2)
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


def test_check_nonfinite_carries_the_streak_across_iterations_and_stops(tmp_path, capsys):
    for it in (2, 4):
        (tmp_path / checkpoint.checkpoint_name(it)).mkdir()
    (tmp_path / "iter_000006.tmp").mkdir()  # incomplete: never named as a resume point
    state = checkpoint.DriverState(iteration=4)
    recovery.check_nonfinite(state, {"policy": [False, True], "critic": [True, False]}, 3, tmp_path)
    assert state.nonfinite_streak == {"policy": 1, "critic": 0}
    assert "policy skipped 1 of 2" in capsys.readouterr().out
    state.iteration = 5
    with pytest.raises(RunStopped) as err:
        recovery.check_nonfinite(state, {"policy": [True, True], "critic": [False, False]}, 3, tmp_path)
    msg = str(err.value)
    assert msg.startswith("ppo iteration 6, policy: 3 optimizer steps in a row") and "\n" not in msg
    assert msg.endswith(f"resume from {tmp_path / 'iter_000004'}")


def test_check_nonfinite_counts_each_role_on_its_own(tmp_path):
    """Policy and critic failing in turn is not a streak of either model."""
    state = checkpoint.DriverState()
    for _ in range(3):
        recovery.check_nonfinite(state, {"policy": [True, False], "critic": [False, True]}, 2, tmp_path)
    assert state.nonfinite_streak == {"policy": 0, "critic": 1}
    with pytest.raises(RunStopped, match="critic: 2 optimizer steps.*no checkpoint was saved yet"):
        recovery.check_nonfinite(state, {"policy": [False], "critic": [True]}, 2, checkpoints=tmp_path)


def test_poisoned_steps_map_run_steps_of_the_env_to_this_iteration(monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "policy:2,5;critic:8")
    assert recovery.announce_poisoned_steps(first_step=1, count=4) == {"policy": [1], "critic": []}
    assert recovery.announce_poisoned_steps(first_step=5, count=4) == {"policy": [0], "critic": [3]}
    assert "poisons policy steps [5]" in capsys.readouterr().out
    monkeypatch.delenv(FAULT_ENV)
    assert recovery.announce_poisoned_steps(first_step=5, count=4) == {"policy": [], "critic": []}


def test_training_actors_poison_the_run_wide_steps_the_variable_names(monkeypatch):
    """The actors read RLHF_FAULT_NONFINITE_STEPS themselves (the driver forwards it to every group): step k
    of a plan is run-wide step plan.first_step + k, for their own role only."""
    policy, critic = object.__new__(PolicyWorker), object.__new__(CriticWorker)
    monkeypatch.setenv(FAULT_ENV, "policy:2,5;critic:8")
    assert [s for s in range(1, 9) if policy._fault_at(s)] == [2, 5]
    assert [s for s in range(1, 9) if critic._fault_at(s)] == [8]
    monkeypatch.delenv(FAULT_ENV)
    assert not any(policy._fault_at(s) or critic._fault_at(s) for s in range(1, 9))
