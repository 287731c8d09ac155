"""Exact resume after the driver is SIGKILLed (issue 8): ``rlhf ppo`` as a subprocess on its own local Ray.

1. ``rlhf ppo`` in its own process group (its Ray -- GCS, raylet, workers -- is started by the driver and
   lives in that group); once the iteration-2 checkpoint exists and iteration 3 is in metrics.jsonl, the
   whole group gets SIGKILL: no clean-up code runs anywhere. No process of that run may survive.
2. The same command again: it says it resumed from the newest complete checkpoint and finishes. Every row of
   its metrics.jsonl equals the uninterrupted run's (the session's ``ppo_reference``, conftest.py, whose
   settings differ only in iterations and checkpoint interval; non-timing keys, rel 1e-6 / abs 1e-9, the
   in-process resume test's tolerance). That run replaces a ``--fresh`` rerun of this command, which cost a
   whole PPO run of its own; ``--fresh`` resuming from nothing is tested in tests/unit/test_ppo_checkpoint.py.

The subprocesses get no ``RAY_ADDRESS``, so each driver starts its own Ray next to the session's (ports
are picked free by ``ray.init``; the dashboard is off, as ``cluster/connect.py`` does for local Ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, TINY_CONFIG, subprocess_env
from tests.integration.conftest import ppo_inputs, reference_variant

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

ITERATIONS = 4
RUN_OVERRIDES = reference_variant([f"ppo.iterations={ITERATIONS}", "ppo.checkpoint_every=2"])
"""The reference run's settings with 4 iterations and a checkpoint every 2."""
RUN_TIMEOUT_S = 600


def ppo_command(out: Path, inputs: list[str], *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "trainers.cli", "ppo", "--config", str(TINY_CONFIG), "--out", str(out),
        *flags, *inputs, *RUN_OVERRIDES,
    ]  # fmt: skip


def start(cmd: list[str], sink, **popen) -> subprocess.Popen:
    """``cmd`` from the repository, output to ``sink``, on its own local Ray and without fault variables."""
    env = subprocess_env(own_ray=True, no_faults=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, **popen)


def run_to_end(cmd: list[str], log: Path) -> str:
    """Run ``cmd`` to completion in its own process group; returns its output; fails on a non-zero exit."""
    with open(log, "w") as sink:
        proc = start(cmd, sink)
        try:
            code = proc.wait(RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    return text


def metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every process below it (Ray's GCS, raylet, workers and vLLM/DeepSpeed helpers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def still_running(procs: list[psutil.Process]) -> list[str]:
    """The processes of ``procs`` that are alive and not zombies, as readable strings."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def sigkill_after(cmd: list[str], out: Path, log: Path) -> tuple[list[str], list[str]]:
    """Start ``cmd`` in a new session; once the iteration-2 checkpoint exists and iteration 3 is logged,
    SIGKILL its process group. Returns (the run's processes at the kill, those still alive 30 s later)."""
    with open(log, "w") as sink:
        proc = start(cmd, sink, start_new_session=True)
        try:
            deadline = time.time() + RUN_TIMEOUT_S
            while not ((out / "checkpoints" / "iter_000002").is_dir() and 3 in metric_steps(out)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint and later iteration in time"
                time.sleep(0.2)
            tree = process_tree(proc.pid)
            names = still_running(tree)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 30
    while still_running(tree) and time.time() < deadline:
        time.sleep(1)
    survivors = still_running(tree)
    for p in tree:  # never leave them behind, even when the assertion below fails
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return names, survivors


def test_sigkilled_driver_resumes_exactly(world_dir, sft_model_dir, rm_model_dir, ppo_reference, tmp_path):
    inputs = ppo_inputs(world_dir, sft_model_dir, rm_model_dir)
    out = tmp_path / "run"
    cmd = ppo_command(out, inputs)

    killed, survivors = sigkill_after(cmd, out, tmp_path / "killed.log")
    (tmp_path / "killed-processes.txt").write_text("\n".join(killed))  # kept for a failure's post-mortem
    assert any("raylet" in p for p in killed) and any("gcs_server" in p for p in killed), killed
    assert not survivors, survivors  # Ray's processes (GCS, raylet, workers) share the driver's fate
    assert metric_steps(out)[:3] == [1, 2, 3]
    assert (out / "checkpoints" / "iter_000002").is_dir() and not (out / "summary.json").exists()

    resumed = run_to_end(cmd, tmp_path / "resumed.log")
    newest = out / "checkpoints" / "iter_000002"
    assert f"ppo: resumed from {newest} (iteration 2)" in resumed, resumed[-3000:]
    assert "ppo/resumed_from_iteration: 2" in resumed
    resumed_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_rows] == list(range(1, ITERATIONS + 1))

    reference_rows = ppo_reference.records[:ITERATIONS]
    assert [r["step"] for r in reference_rows] == list(range(1, ITERATIONS + 1))
    for row, ref in zip(resumed_rows, reference_rows):
        for key in (k for k in ref if not k.startswith("timing/")):
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (row["step"], key)
