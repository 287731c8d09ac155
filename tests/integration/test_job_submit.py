"""`ray start --head` + `ray job submit -- rlhf ppo ...`: the README's local-cluster path, for real.

The head runs with `--block` in its own process group, so the test ends exactly that cluster (never
`ray stop`, which would stop every Ray instance on the machine, including the test session's own).
It gets its own token file: Ray 2.60 token authentication stays on.

Ray maps 127.0.0.1 to the machine's own interface address for its internal services
(`ray._private.services.resolve_ip_for_localhost`), so a one-machine cluster talks over this host's
own address; the dashboard and job API listen on 127.0.0.1 only. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


PORT_FLAGS = (
    "port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on this machine in a temporary directory, token authentication on, shared by this
    module's tests (it takes ~2.5 min to take jobs on 2 busy cores); yields (dashboard address, env with
    the token, GCS address ``host:port`` that ``ray.init`` joins)."""
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = {name: free_port() for name in PORT_FLAGS}
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        # Every service with a fixed default port gets a free one: the test session's own Ray holds
        # the defaults (e.g. the dashboard agent's 52365), and a clash leaves the head without a job
        # agent ("No available agent to submit job").
        *(f"--{name}={port}" for name, port in ports.items()),
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--num-cpus=8",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in the finaliser
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while subprocess.run(
            ["ray", "job", "list", "--address", address], env=env, capture_output=True
        ).returncode:
            assert head.poll() is None, (Path(tmp) / "head.log").read_text()[-2000:]
            assert time.time() < deadline, "the Ray head's job API did not come up in 180 s"
            time.sleep(2)
        from ray._private.services import resolve_ip_for_localhost  # where the head's GCS listens

        yield address, env, f"{resolve_ip_for_localhost('127.0.0.1')}:{ports['port']}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def job_status(address: str, env: dict, job_id: str) -> str:
    """The job's status as `ray job status` words it (ray/dashboard/modules/job/cli.py)."""
    out = subprocess.run(
        ["ray", "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
    )
    text = out.stdout + out.stderr
    for phrase, status in ((f"'{job_id}' succeeded", "SUCCEEDED"), (f"'{job_id}' failed", "FAILED"),
                           (f"'{job_id}' was stopped", "STOPPED")):  # fmt: skip
        if phrase in text:
            return status
    return "RUNNING" if f"Status for job '{job_id}'" in text else "UNKNOWN"


def test_ray_job_submit_runs_ppo_on_a_started_head(
    ray_head, world_dir, sft_model_dir, rm_model_dir, tmp_path
):
    address, env, _ = ray_head
    out = tmp_path / "ppo"
    job_id = f"rlhf-test-{secrets.token_hex(4)}"
    entrypoint = [
        "rlhf", "ppo", "--config", "trainers/configs/tiny.yaml", "--out", str(out),
        f"data.dir={world_dir}", f"model.path={sft_model_dir}", f"reward.path={rm_model_dir}",
        "ppo.iterations=1", "ppo.prompts_per_iteration=8", "ppo.samples_per_prompt=1", "ppo.ppo_epochs=1",
        "ppo.mini_batch_size=8", "ppo.micro_batch_size=4", "ppo.policy_workers=1", "ppo.checkpoint_every=0",
        "rollout.max_new_tokens=16",
    ]  # fmt: skip
    cmd = ["ray", "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(REPO), "--", *entrypoint]  # fmt: skip
    for _ in range(30):  # the job API answers before its agent can take jobs ("No available agent")
        submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if "No available agent" not in submit.stderr + submit.stdout:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    deadline, status = time.time() + 600, "PENDING"
    while status in ("PENDING", "RUNNING", "UNKNOWN") and time.time() < deadline:
        time.sleep(5)
        status = job_status(address, env, job_id)
    logs = subprocess.run(
        ["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True
    )
    assert status == "SUCCEEDED", logs.stdout[-4000:]

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "objective/score" in metrics[0]
    assert (out / "model" / "config.json").exists()
    assert list((out / "model").glob("*.safetensors"))


def test_joining_a_token_cluster_without_its_token_names_the_cause_and_the_fix(ray_head, world_dir, tmp_path):
    """Ray 2.60 turns token authentication on by default. A client without the token used to get only
    "Failed to connect to Ray cluster"; now its one ``rlhf: error:`` line says why and how to give it.
    Two clients: one that does not know the cluster uses tokens (no RAY_AUTH_MODE: Ray retries, then
    fails without a reason) and one that does but has none."""
    _, env, gcs = ray_head
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    home = tmp_path / "home"  # no ~/.ray/auth_token of this machine's other Ray instances
    home.mkdir()
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home)}
    for client in (bare, bare | {"RAY_AUTH_MODE": "token"}):
        out = tmp_path / f"out-{len(client)}"
        args = ["pretrain", "--config", "trainers/configs/tiny.yaml", f"data.dir={world_dir}",
                f"cluster.ray_address={gcs}", "--out", str(out)]  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "trainers.cli", *args], cwd=REPO, env=client, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        ours = [line for line in result.stderr.splitlines() if line.startswith("rlhf:")]
        assert ours == [result.stderr.strip().splitlines()[-1]], result.stderr[-2000:]
        line = ours[0]
        assert line.startswith(f"rlhf: error: cannot connect to Ray at '{gcs}': ")
        assert "token" in line and "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN_PATH" in line, line
        assert token not in result.stderr + result.stdout
        assert not out.exists()
