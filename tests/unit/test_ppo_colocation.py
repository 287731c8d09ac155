"""Colocated GPU placement on CPU: the engines' sleep and wake over whole iterations of the driver
(:mod:`trainers.ppo.colocation`, :func:`trainers.ppo.driver.iterate`).

The driver's own code runs; its phases (generate, experience, train, the weight push, evaluation,
checkpoints) and the engines are stand-ins that log what they were asked, and each engine keeps its
memory as vLLM's sleep mode does (level 1 sleep: weights and KV cache gone; ``wake_up(tags)`` brings the
named ones back). A phase that touches an engine whose memory is not there fails the test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainers import algos
from trainers.config import config_from_dict
from trainers.ppo import driver
from trainers.ppo.checkpoint import DriverState
from trainers.ppo.colocation import ASLEEP, AWAKE, WEIGHTS_ONLY, EngineMemory


class Remote:
    """``handle.method.remote(*args)`` of a fake actor: runs ``fn`` at once, returns its result."""

    def __init__(self, fn):
        self.remote = fn


class FakeEngine:
    """A rollout engine's memory as vLLM's sleep mode keeps it; every call is logged as ``(rank, what)``."""

    def __init__(self, rank: int, log: list):
        self.rank, self.log = rank, log
        self.held = {"weights", "kv_cache"}
        self.sleep = Remote(self._sleep)
        self.wake_up = Remote(self._wake_up)

    def _sleep(self, level: int = 1) -> bool:
        self.log.append((self.rank, "sleep"))
        self.held = set()
        return True

    def _wake_up(self, tags: list[str] | None = None) -> bool:
        self.log.append((self.rank, f"wake {','.join(tags)}"))
        self.held |= set(tags)
        return True

    def use(self, phase: str, needs: set[str]) -> None:
        """A phase reads the engine: it must hold exactly ``needs`` (the sync wants the KV cache away)."""
        assert self.held == needs, f"{phase} on engine {self.rank} holding {sorted(self.held)}"
        self.log.append((self.rank, phase))


def resolve(values: list) -> list:
    """``ray.get`` for the fake actors' results (already values)."""
    return list(values)


def test_engine_memory_moves_once_per_state_and_only_when_colocated():
    log: list = []
    engines = [FakeEngine(0, log), FakeEngine(1, log)]
    memory = EngineMemory(lambda: engines, colocated=True, get=resolve)
    memory.require_awake("generation")
    memory.sleep()
    memory.sleep()  # asleep already: nothing sent
    assert memory.state == ASLEEP
    with pytest.raises(RuntimeError, match="generation needs the rollout engines awake, but they are asleep"):
        memory.require_awake("generation")
    with pytest.raises(RuntimeError, match="KV cache woken before their weights"):
        memory.wake_kv_cache()
    memory.wake_weights()
    memory.wake_weights()
    assert memory.state == WEIGHTS_ONLY
    memory.wake_kv_cache()
    memory.wake_kv_cache()
    assert memory.state == AWAKE and all(e.held == {"weights", "kv_cache"} for e in engines)
    assert log == [(r, what) for what in ("sleep", "wake weights", "wake kv_cache") for r in (0, 1)]

    dedicated = EngineMemory(lambda: engines, colocated=False, get=resolve)
    log.clear()
    dedicated.sleep()
    dedicated.wake_weights()
    dedicated.wake_kv_cache()
    dedicated.require_awake("generation")
    assert log == [] and dedicated.state == AWAKE


def fake_phases(monkeypatch, engines: list[FakeEngine], log: list) -> None:
    """Replace the driver's phases by stand-ins that use the engines (or not) and log their names."""

    def sample_rollouts(roles, cfg, data, state, score):
        for e in engines:
            e.use("generate", {"weights", "kv_cache"})
        return SimpleNamespace(rollout=[0] * 4)

    def make_experience(roles, cfg, data, sampled, scorer, kl_coef, iteration):
        assert all(not e.held for e in engines), "experience passes while the engines hold GPU memory"
        log.append(("driver", "experience"))
        return SimpleNamespace(tokens=SimpleNamespace(response_mask=None, row_lengths=list)), {
            "objective/kl": 0.0
        }

    def train(roles, experience, plan):
        assert all(not e.held for e in engines), "training while the engines hold GPU memory"
        log.append(("driver", "train"))
        return {}, {}

    def with_engine_recovery(roles, phase, call, push_first=True):
        assert phase == "weight sync" and not push_first
        for e in engines:
            e.use("push weights", {"weights"})
        return {"bytes": 8, "buckets": 1}

    def evaluate(roles, cfg, data, scorer, iteration):
        for e in engines:
            e.use("evaluate", {"weights", "kv_cache"})
        return {}

    plan = SimpleNamespace(ptx_rows=0, first_step=0, minibatches=[], policy=None)
    monkeypatch.setattr(driver, "sample_rollouts", sample_rollouts)
    monkeypatch.setattr(driver, "make_experience", make_experience)
    monkeypatch.setattr(driver, "plan_training", lambda *args, **kwargs: plan)
    monkeypatch.setattr(driver, "padding_metrics", lambda *args, **kwargs: {})
    monkeypatch.setattr(driver, "announce_poisoned_steps", lambda *args: None)
    monkeypatch.setattr(driver, "train", train)
    monkeypatch.setattr(driver, "check_nonfinite", lambda *args: None)
    monkeypatch.setattr(driver, "with_engine_recovery", with_engine_recovery)
    monkeypatch.setattr(driver, "evaluate", evaluate)
    monkeypatch.setattr(driver, "save_checkpoint", lambda *args: log.append(("driver", "checkpoint")))
    monkeypatch.setattr(
        driver, "engine_memory", lambda roles: EngineMemory(roles.engines, roles.colocated_gpu, get=resolve)
    )


def run_two_iterations(monkeypatch, tmp_path, colocated_gpu: bool) -> list:
    """``driver.iterate`` over two iterations (evaluation after each) with two fake engines; the log."""
    log: list = []
    engines = [FakeEngine(0, log), FakeEngine(1, log)]
    fake_phases(monkeypatch, engines, log)
    cfg = config_from_dict(
        {"ppo": {"iterations": 2, "eval_every": 1, "checkpoint_every": 0}, "logging": {"progress": False}}
    )
    roles = SimpleNamespace(engines=lambda: engines, colocated_gpu=colocated_gpu, engine_restarts=0)
    kl_ctl = algos.make_kl_controller("fixed", 0.1)
    state = DriverState(kl_controller=kl_ctl.state_dict())
    writer = SimpleNamespace(log=lambda iteration, metrics: log.append(("driver", f"log {iteration}")))
    driver.iterate(
        roles, cfg, SimpleNamespace(ptx=[], pad_id=0), state, kl_ctl, writer, tmp_path, scorer=None
    )
    assert state.iteration == 2
    return log


def per_engine(log: list, rank: int) -> list[str]:
    return [what for who, what in log if who == rank]


def test_colocated_iteration_sleeps_engines_for_training_and_wakes_weights_before_the_sync(
    monkeypatch, tmp_path
):
    log = run_two_iterations(monkeypatch, tmp_path, colocated_gpu=True)
    one = ["generate", "sleep", "wake weights", "push weights", "wake kv_cache", "evaluate"]
    assert per_engine(log, 0) == per_engine(log, 1) == one * 2
    # Every engine sleeps before the first experience pass and is back before the iteration is logged.
    order = [what if who == "driver" else f"{what} {who}" for who, what in log]
    first = order[: order.index("log 1") + 1]
    assert (
        first.index("sleep 1")
        < first.index("experience")
        < first.index("train")
        < first.index("wake weights 0")
    )
    assert first.index("wake kv_cache 1") < first.index("evaluate 0")
    assert order[-1] == "checkpoint"


def test_dedicated_iteration_never_sleeps_the_engines(monkeypatch, tmp_path):
    """Dedicated GPUs (or CPU): the engines keep their memory; the sync then writes into awake engines."""
    log: list = []
    engines = [FakeEngine(0, log)]
    fake_phases(monkeypatch, engines, log)

    def push_awake(roles, phase, call, push_first=True):
        engines[0].use("push weights", {"weights", "kv_cache"})
        return {"bytes": 8, "buckets": 1}

    def experience_awake(roles, cfg, data, sampled, scorer, kl_coef, iteration):
        assert engines[0].held == {"weights", "kv_cache"}
        return SimpleNamespace(tokens=SimpleNamespace(response_mask=None, row_lengths=list)), {
            "objective/kl": 0.0
        }

    def train_awake(roles, experience, plan):
        return {}, {}

    monkeypatch.setattr(driver, "with_engine_recovery", push_awake)
    monkeypatch.setattr(driver, "make_experience", experience_awake)
    monkeypatch.setattr(driver, "train", train_awake)
    cfg = config_from_dict({"ppo": {"iterations": 1}, "logging": {"progress": False}})
    roles = SimpleNamespace(engines=lambda: engines, colocated_gpu=False, engine_restarts=0)
    kl_ctl = algos.make_kl_controller("fixed", 0.1)
    state = DriverState(kl_controller=kl_ctl.state_dict())
    writer = SimpleNamespace(log=lambda iteration, metrics: None)
    driver.iterate(
        roles, cfg, SimpleNamespace(ptx=[], pad_id=0), state, kl_ctl, writer, tmp_path, scorer=None
    )
    assert per_engine(log, 0) == ["generate", "push weights"]


def test_resumed_start_up_sync_wakes_nothing(monkeypatch):
    """The sync after loading a checkpoint meets awake engines: no ``wake_up`` (vLLM would only warn)."""
    log: list = []
    engines = [FakeEngine(0, log)]
    fake_phases(monkeypatch, engines, log)
    monkeypatch.setattr(
        driver,
        "with_engine_recovery",
        lambda roles, phase, call, push_first=True: (
            engines[0].use("push weights", {"weights", "kv_cache"}) or {"bytes": 8, "buckets": 1}
        ),
    )
    roles = SimpleNamespace(engines=lambda: engines, colocated_gpu=True, engine_restarts=0)
    assert driver.sync_weights(roles) == {"sync/bytes": 8.0, "sync/buckets": 1.0}
    assert per_engine(log, 0) == ["push weights"]
