"""What the tests that start their own Ray clusters share: a ``rlhf ppo`` subprocess joining a cluster,
its log and metrics, the start-up placement lines, and the metric comparison with the uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_ports, subprocess_env

RUN_TIMEOUT_S = 600
REL, ABS = 1e-6, 1e-9
PLACED_RE = re.compile(r"^ppo: placed (\w+): (.*)$", re.M)
RANK_RE = re.compile(r"rank (\d+) -> ([0-9a-f]+) ")


def own_ports() -> dict[str, int]:
    """Free ports for the per-node services whose defaults the session's own Ray already holds."""
    names = (
        "dashboard_agent_listen_port",
        "metrics_agent_port",
        "metrics_export_port",
        "runtime_env_agent_port",
    )
    return dict(zip(names, free_ports(len(names)), strict=True))


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """``cmd`` from the repository, joining the cluster by address only (no ``RAY_ADDRESS``), output to ``log``;
    ``env``: variables to add (e.g. the cluster's token settings)."""
    sink = open(log, "w")  # noqa: SIM115 - the child holds it; closed with the process
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(own_ray=True, no_faults=True, **env),
        stdout=sink,
        stderr=subprocess.STDOUT,
    )
    sink.close()
    return proc


def wait_for(proc: subprocess.Popen, log: Path, ready, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        assert proc.poll() is None, f"run ended before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        code = proc.wait(RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text()


def stop_head(proc: subprocess.Popen) -> None:
    """End a ``ray start --head --block`` started in its own process group: SIGTERM, then SIGKILL of the
    group after 5 s. On SIGTERM ``ray start --block`` spends ~35 s stopping its children; the group's
    SIGKILL ends the same processes (the workers, in groups of their own, follow their raylet)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def our_line(text: str) -> str:
    """The run's one ``rlhf:`` line (asserted to be the only one). Not simply the last line: the driver
    also prints what Ray's log monitor forwards (e.g. the GCS failing to free a dead node's bundles),
    and that can arrive after our line."""
    ours = [line for line in text.splitlines() if line.startswith("rlhf:")]
    assert len(ours) == 1, text[-3000:]
    return ours[0]


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def placed(text: str) -> dict[str, list[str]]:
    """The start-up lines ``ppo: placed ROLE: rank R -> NODE (ip), ...`` as role -> node id prefix per rank."""
    return {
        role: [node for _, node in sorted((int(r), n) for r, n in RANK_RE.findall(ranks + " "))]
        for role, ranks in PLACED_RE.findall(text)
    }


def assert_same_metrics(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for row, ref in zip(records, reference):
        for key in (k for k in ref if not k.startswith("timing/") and k != "rollout/engine_restarts"):
            assert row[key] == pytest.approx(ref[key], rel=REL, abs=ABS), (row["step"], key)
