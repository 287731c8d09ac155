"""SIGKILL of a stage's driver process (`rlhf sft` / `rlhf rm`), then the same command again.

Each run is a subprocess in its own session (process group) and starts its own local Ray (no address
is given; RAY_ADDRESS is removed from its environment, and its output must say it started a local
instance). Once a checkpoint exists and a later step is in metrics.jsonl, the driver's process group
gets SIGKILL. The Ray processes the driver started must die with it. Seen here: GCS, raylet and the
agents are in the driver's process group and die at once; Ray's worker processes (``ray::RayTrainWorker``,
the Train controller, ...) each have a process group of their own -- only the session id is the
driver's -- so the group kill misses them, and they fate-share only when they notice the raylet is
gone: 2-3 s later, in which time the workers still ran two steps and wrote checkpoint folders that
Ray Train's controller never registered. So the test tracks every process of the driver's session and
requires all of them to be gone within ``FATE_SHARE_TIMEOUT_S`` (anything left is then killed by pid
and fails the test). Ray Train resumes only from a checkpoint its controller *registered* (named in
checkpoint_manager_snapshot.json; the controller takes reports every 2 s), so the kill waits for a
registered checkpoint; the rerun's first line must name it truthfully and equal the step the workers
actually restored (seen: folders up to step 6 on disk, resumed from the registered step 2).

The rerun must say it resumes, and its metrics.jsonl must hold every step once with the same numbers
as the uninterrupted session fixture run (same config; checkpointing and max_steps do not change the
maths: the LR schedule always spans all epochs). Tolerance: loss and grad_norm rel 1e-6 (they come out
bit-identical: a checkpoint holds the DeepSpeed fp32 state, step counters and each rank's RNG), lr
1e-12, unit counts exact. `--fresh` then starts over and matches the same reference from step 1; it runs
only ``FRESH_STEPS`` steps (`max_steps` is no part of a checkpoint's run shape, and steps 1-4 are what
tell a fresh start from a resume after step 2 or later), not all 16 again.
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
from tests.integration.conftest import stage_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_STEPS = 16
"""Long enough that workers outliving the killed driver by a few steps cannot finish the run."""
FATE_SHARE_TIMEOUT_S = 60
EXTRA = ["checkpoint_every=2", "keep_checkpoints=10"]
FRESH_STEPS = 4
"""The ``--fresh`` rerun's max_steps: past the registered checkpoint (step 2 or later) it ignores."""
RUN_TIMEOUT_S = 420


def stage_command(
    stage: str, out: Path, world_dir: Path, model_dir: Path, fresh: bool = False, max_steps: int = MAX_STEPS
) -> list[str]:
    """``rlhf STAGE`` with the session fixture's overrides plus max_steps/checkpoint_every."""
    extra = [f"max_steps={max_steps}", *EXTRA]
    overrides = stage_overrides(stage, world_dir, model_dir, [f"{stage}.{e}" for e in extra])
    cmd = [sys.executable, "-m", "trainers.cli", stage, "--config", str(TINY_CONFIG), "--out", str(out)]
    return cmd + overrides + (["--fresh"] if fresh else [])


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """The command in its own session (= process group), output to ``log``, on its own local Ray."""
    env = subprocess_env(own_ray=True)
    with log.open("w") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )


def run_to_end(cmd: list[str], log: Path) -> str:
    """Run the command to completion; its output (asserts exit code 0)."""
    proc = start(cmd, log)
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        kill_session(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Started a local Ray instance" in text  # its own Ray, not the test session's
    return text


def session_processes(driver_pid: int) -> list[psutil.Process]:
    """Live processes of the session the driver leads (it was started with ``start_new_session``): the
    Ray instance it started, workers included, whatever their process group."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != driver_pid and os.getsid(proc.pid) == driver_pid:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (its own session) if anything of it is still alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def registered_step(out: Path, stage: str) -> int:
    """Step of the newest checkpoint Ray Train registered (0 if none): the one a rerun restores."""
    from trainers.stages.checkpoints import latest_checkpoint_state

    return (latest_checkpoint_state(out / "checkpoints" / stage) or {}).get("step", 0)


def newest_checkpoint_step(out: Path, stage: str) -> int:
    """Highest step of any checkpoint folder on disk, registered or not."""
    steps = [
        json.loads(p.read_text())["step"]
        for p in (out / "checkpoints" / stage).glob("step_*/trainer_state.json")
    ]
    return max(steps, default=0)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line being written
    return steps


def kill_mid_run(cmd: list[str], out: Path, stage: str, log: Path) -> tuple[int, int]:
    """Start the command, SIGKILL its process group once a checkpoint exists and a later step is logged;
    check its Ray processes die with it. Returns, once they are gone, the step of the checkpoint Ray
    Train registered last and the highest checkpoint step on disk."""
    proc = start(cmd, log)
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        while time.time() < deadline and proc.poll() is None:
            ckpt = registered_step(out, stage)
            if ckpt and max(logged_steps(out), default=0) > ckpt:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        ray_procs = session_processes(proc.pid)
        assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in ray_procs), "no Ray Train workers found"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(ray_procs, timeout=FATE_SHARE_TIMEOUT_S)
        assert not alive, f"Ray processes outlived the killed driver: {[p.pid for p in alive]}"
        return registered_step(out, stage), newest_checkpoint_step(out, stage)
    finally:
        for leftover in session_processes(proc.pid):  # only this run's processes, by pid
            leftover.kill()
        kill_session(proc)


def reference_records(run) -> dict[int, dict]:
    from trainers.runs.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run.out / "metrics.jsonl") if r["step"] <= MAX_STEPS}


def assert_same_as_reference(
    out: Path, reference: dict[int, dict], units: str, steps: int = MAX_STEPS
) -> None:
    from trainers.runs.metrics import read_metrics

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # every step once, in order
    for r in records:
        ref = reference[r["step"]]
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6), r["step"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6), r["step"]
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12), r["step"]
        assert r[units] == ref[units]
        assert r["skipped"] == 0


def kill_and_resume(stage: str, units: str, out: Path, cmd: list[str], reference: dict) -> str:
    registered, on_disk = kill_mid_run(cmd, out, stage, out.parent / f"{stage}-killed.log")
    assert 2 <= registered <= on_disk < MAX_STEPS
    text = run_to_end(cmd, out.parent / f"{stage}-resumed.log")
    announced = int(text.split("resuming after step ")[1].split()[0].rstrip(","))
    summary = json.loads((out / "summary.json").read_text())
    assert summary[f"{stage}/resumed_from_step"] == announced == registered  # the line tells the truth
    assert summary[f"{stage}/steps"] == MAX_STEPS
    assert_same_as_reference(out, reference, units)
    return text


def sft_kill_resume_fresh(sft_run, base_model_dir: Path, world_dir: Path, tmp: Path) -> None:
    out = tmp / "sft"
    reference = reference_records(sft_run)
    kill_and_resume(
        "sft", "target_tokens", out, stage_command("sft", out, world_dir, base_model_dir), reference
    )

    fresh = stage_command("sft", out, world_dir, base_model_dir, fresh=True, max_steps=FRESH_STEPS)
    text = run_to_end(fresh, tmp / "fresh.log")
    assert "resuming" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft/resumed_from_step"] is None and summary["sft/steps"] == FRESH_STEPS
    assert_same_as_reference(out, reference, "target_tokens", FRESH_STEPS)  # started over: from step 1


def rm_kill_resume(rm_run, sft_model_dir: Path, world_dir: Path, tmp: Path) -> None:
    out = tmp / "rm"
    cmd = stage_command("rm", out, world_dir, sft_model_dir)
    kill_and_resume("rm", "prompts", out, cmd, reference_records(rm_run))


@pytest.fixture(scope="module")
def chains(sft_run, rm_run, base_model_dir, sft_model_dir, world_dir, tmp_path_factory):
    """Both stages' kill-and-rerun chains, side by side (a thread each; every run is a process group of
    its own, and each chain finds its processes by its driver's session id). One chain alone keeps the
    2 cores ~60 % busy (process and Ray start-up, the 60 s fate-share watch, checkpoint writes). Each test
    takes its own chain's outcome: ``result()`` re-raises that chain's failed assertion."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("stage_sigkill")
    with ThreadPoolExecutor(2) as pool:
        futures = {
            "sft": pool.submit(sft_kill_resume_fresh, sft_run, base_model_dir, world_dir, tmp),
            "rm": pool.submit(rm_kill_resume, rm_run, sft_model_dir, world_dir, tmp),
        }
        for future in futures.values():
            future.exception()  # wait for both before either test reads its own
    return futures


def test_sft_driver_sigkill_resume_and_fresh(chains):
    chains["sft"].result()


def test_rm_driver_sigkill_resume(chains):
    chains["rm"].result()
