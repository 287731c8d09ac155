"""Non-finite steps: streak bookkeeping and the stop line (trainers/runtime/nonfinite.py; the DeepSpeed side
is in tests/integration/test_nonfinite_runs.py). The PPO driver's parts are in test_ppo_metrics.py (skipped
steps in the means) and test_ppo_recovery.py (streaks); the stages' stop translation in test_stages_driver.py."""

from __future__ import annotations

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
