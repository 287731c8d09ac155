"""Non-finite steps: streak bookkeeping, the PPO driver's metrics and stop rule (pure parts; the DeepSpeed
side is in tests/integration/test_nonfinite_runs.py, the stages' stop translation in test_stages_driver.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from cluster.faults import NONFINITE_ENV as FAULT_ENV
from trainers.errors import RunStopped
from trainers.ppo import checkpoint, metrics, recovery
from trainers.runs.resume import resume_hint
from trainers.runtime.nonfinite import (
    stop_message,
    update_streak,
)


def test_update_streak_carries_resets_and_reports_the_longest():
    assert update_streak(0, [False, True, True]) == (2, 2)
    assert update_streak(2, [True, False]) == (0, 3)  # reached 3 mid-way, then broken
    assert update_streak(1, []) == (1, 1)
    assert update_streak(5, [False]) == (0, 5)


def test_stop_message_is_one_line_with_the_limit_and_the_resume_point():
    msg = stop_message("sft step 6", 3, 3, resume_hint("/o/checkpoints/sft/step_0000004"))
    assert "\n" not in msg
    assert msg.startswith("sft step 6: 3 optimizer steps in a row")
    assert "max_nonfinite_steps=3" in msg and msg.endswith("resume from /o/checkpoints/sft/step_0000004")
    assert "starts from the beginning" in resume_hint(None)


# --- PPO driver -------------------------------------------------------------------------------------


def _stats(tokens, loss, skipped=0.0, grad=1.0, ptx=0.0):
    return {
        "tokens": tokens,
        "loss_sum": loss * tokens,
        "clip_sum": 0.0,
        "approx_kl_sum": 0.0,
        "entropy_sum": tokens,
        "ratio_sum": tokens,
        "ratio_sq_sum": tokens,
        "max_abs_log_ratio": 0.0,
        "max_grad_norm": grad,
        "ptx_sum": ptx,
        "skipped": skipped,
    }


def test_skipped_steps_are_counted_and_left_out_of_the_means():
    nan = math.nan
    rank0 = [_stats(2, 1.0, ptx=2.0), _stats(2, nan, 1.0, math.inf, nan), _stats(2, 3.0, ptx=6.0)]
    rank1 = [_stats(2, 1.0, ptx=2.0), _stats(2, 1.0, 1.0, math.inf, 1.0), _stats(2, 3.0, ptx=6.0)]
    steps = metrics.sum_over_ranks([rank0, rank1])
    assert [s["skipped"] for s in steps] == [0.0, 1.0, 0.0]  # a flag, not summed over ranks
    m = metrics.policy_metrics(steps, ptx_tokens=[4, 4, 8])
    assert m["policy/skipped_steps"] == 1.0
    assert m["loss/policy"] == pytest.approx((4 * 1.0 + 4 * 3.0) / 8)
    assert m["policy/grad_norm"] == 1.0
    assert m["loss/ptx"] == pytest.approx((4.0 + 12.0) / 12)
    assert all(math.isfinite(v) for v in m.values())
    c = metrics.critic_metrics(steps)
    assert c["value/skipped_steps"] == 1.0 and c["loss/value"] == pytest.approx(2.0)


def test_an_iteration_with_every_step_skipped_reports_nan_not_zero():
    steps = [_stats(4, math.nan, 1.0, math.inf)]
    m = metrics.policy_metrics(steps, ptx_tokens=[3])
    assert m["policy/skipped_steps"] == 1.0
    assert math.isnan(m["loss/policy"]) and math.isnan(m["policy/grad_norm"]) and math.isnan(m["loss/ptx"])
    assert math.isnan(metrics.critic_metrics(steps)["loss/value"])


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


def test_the_streak_round_trips_through_a_checkpoint_and_old_checkpoints_load():
    state = checkpoint.DriverState(iteration=3, nonfinite_streak={"policy": 2, "critic": 0})
    saved = json.loads(json.dumps(dataclasses.asdict(state)))
    assert checkpoint.DriverState(**saved).nonfinite_streak == {"policy": 2, "critic": 0}
    del saved["nonfinite_streak"]  # written before the field existed
    assert checkpoint.DriverState(**saved).nonfinite_streak == {}


def test_poisoned_steps_map_run_steps_of_the_env_to_this_iteration(monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "policy:2,5;critic:8")
    assert recovery.announce_poisoned_steps(first_step=1, count=4) == {"policy": [1], "critic": []}
    assert recovery.announce_poisoned_steps(first_step=5, count=4) == {"policy": [0], "critic": [3]}
    assert "poisons policy steps [5]" in capsys.readouterr().out
    monkeypatch.delenv(FAULT_ENV)
    assert recovery.announce_poisoned_steps(first_step=5, count=4) == {"policy": [], "critic": []}
