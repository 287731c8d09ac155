"""trainers.stages.driver, the parts that need no Ray: a stop for non-finite steps becomes RunStopped
naming the newest checkpoint, and the fault-injection lines (and refusals) before any worker starts."""

from __future__ import annotations

import json

import pytest

from cluster.faults import FAIL_AFTER_ENV, NONFINITE_ENV
from trainers.config import SFTConfig
from trainers.errors import RunStopped
from trainers.stages.checkpoints import SNAPSHOT_FILE, TRAINER_STATE_FILE, newest_checkpoint
from trainers.stages.driver import announce_faults, raise_if_stopped


def _checkpoint(storage, step):
    """A checkpoint folder named in Ray Train's snapshot as the latest."""
    path = storage / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / TRAINER_STATE_FILE).write_text(json.dumps({"step": step}))
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": path.name, "metrics": {}}}
    (storage / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return path


def test_stage_stop_becomes_run_stopped_naming_the_newest_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    assert newest_checkpoint(tmp_path) == newest
    raise_if_stopped("sft", None, SFTConfig(), tmp_path)  # a normal finish
    with pytest.raises(RunStopped) as err:
        raise_if_stopped("sft", {"stopped": {"step": 13, "longest": 3}}, SFTConfig(), tmp_path)
    assert str(err.value).startswith("sft step 13: 3 optimizer steps in a row")
    assert str(err.value).endswith(f"resume from {newest}")
    assert newest_checkpoint(tmp_path / "missing") is None


def test_fault_injection_is_announced_for_this_stage_only(monkeypatch, capsys):
    monkeypatch.setenv(NONFINITE_ENV, "sft:4-6;policy:2")
    monkeypatch.setenv(FAIL_AFTER_ENV, "sft:3")
    announce_faults("sft")
    assert capsys.readouterr().out.splitlines() == [
        f"sft: fault injection ({NONFINITE_ENV}) poisons steps [4, 5, 6]",
        f"sft: fault injection ({FAIL_AFTER_ENV}) fails after step 3",
    ]
    announce_faults("rm")
    assert capsys.readouterr().out == ""


def test_a_malformed_fault_variable_is_refused_before_any_worker_starts(monkeypatch):
    monkeypatch.setenv(NONFINITE_ENV, "sfx:4")  # a typo must not silently disarm the fault
    with pytest.raises(ValueError, match=NONFINITE_ENV):
        announce_faults("sft")
