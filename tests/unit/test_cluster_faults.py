"""cluster.faults: the test-only fault injector read from RLHF_FAULT_* variables (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.faults import (
    FAIL_AFTER_ENV,
    KILL_ENGINE_ENV,
    NONFINITE_ENV,
    FaultInjector,
    fault_env,
    parse_fault_steps,
    parse_kill_spec,
)
from tests.conftest import REPO, subprocess_env


def test_parse_kill_spec_reads_entries_and_rejects_malformed_ones():
    assert parse_kill_spec("generate:5@/tmp/a; weights:3@/tmp/b;") == (
        ("generate:5", "/tmp/a"),
        ("weights:3", "/tmp/b"),
    )
    assert parse_kill_spec("") == ()
    with pytest.raises(ValueError, match="generate:5"):
        parse_kill_spec("generate:5")


def test_parse_fault_steps_roles_lists_and_ranges():
    assert parse_fault_steps("policy:2,3;critic:6-8") == {"policy": {2, 3}, "critic": {6, 7, 8}}
    assert parse_fault_steps(" sft : 4 ; sft:4,5 ") == {"sft": {4, 5}}
    assert parse_fault_steps(None) == {} and parse_fault_steps("") == {}


@pytest.mark.parametrize("text", ["policy", "policy:x", "polcy:3", "policy:0", "policy:5-3", "3,4"])
def test_parse_fault_steps_rejects_anything_else(text):
    """A typo must fail loudly, never silently disarm (or arm) a fault."""
    with pytest.raises(ValueError, match=NONFINITE_ENV):
        parse_fault_steps(text)


def test_the_injector_reads_only_its_variables_and_is_inert_without_them():
    faults = FaultInjector.from_env(
        {NONFINITE_ENV: "policy:1;critic:2", FAIL_AFTER_ENV: "sft:3", "PATH": "/"}
    )
    assert faults.nonfinite("policy", 1) and not faults.nonfinite("policy", 2)
    assert faults.nonfinite("critic", 2) and not faults.nonfinite("sft", 1)
    assert (
        faults.fails_after("sft", 3) and not faults.fails_after("sft", 2) and not faults.fails_after("rm", 3)
    )
    inert = FaultInjector.from_env({})
    assert not inert.nonfinite("policy", 1) and not inert.fails_after("sft", 3) and inert.kill_engine == ()
    with pytest.raises(ValueError, match=FAIL_AFTER_ENV):
        FaultInjector.from_env({FAIL_AFTER_ENV: "policy:3"})  # only stages fail this way
    with pytest.raises(ValueError, match=FAIL_AFTER_ENV):
        FaultInjector.from_env({FAIL_AFTER_ENV: "sft:3,4"})  # one step per stage


def test_nonfinite_in_maps_run_steps_into_one_call():
    # Iteration 2 (0-based) of 4 optimizer steps each runs run-wide steps 9..12.
    faults = FaultInjector.from_env({NONFINITE_ENV: "policy:3,9,12,13"})
    assert faults.nonfinite_in("policy", first_step=9, count=4) == [0, 3]
    assert faults.nonfinite_in("critic", 1, 4) == []


def crash_point(point: str, env: dict) -> int:
    """Exit status of a fresh interpreter that passes the engine kill point ``point``."""
    code = f"from cluster.faults import injector; injector().kill_engine_at({point!r}); print('went on')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) == ("went on" in proc.stdout), proc.stderr
    return proc.returncode


def test_kill_point_crashes_once_per_marker_and_only_at_its_point(tmp_path):
    marker = tmp_path / "marker"
    env = subprocess_env(**{KILL_ENGINE_ENV: f"generate:7@{marker}"})
    assert crash_point("generate:8", env) == 0 and not marker.exists()  # another point: nothing
    assert crash_point("generate:7", env) == 1 and marker.exists()  # crashes, leaves the marker
    assert crash_point("generate:7", env) == 0  # the restarted process goes on
    env.pop(KILL_ENGINE_ENV)
    marker.unlink()
    assert crash_point("generate:7", env) == 0  # unset: never fires


def test_fault_env_forwards_only_fault_variables():
    assert fault_env({KILL_ENGINE_ENV: "x@y", "RLHF_OTHER": "1", "PATH": "/bin"}) == {KILL_ENGINE_ENV: "x@y"}
