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
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.upload import measure_upload
from tests.conftest import REPO, free_ports
from tests.integration.cluster_runs import stop_head

pytestmark = [pytest.mark.integration, pytest.mark.slow]


PORT_FLAGS = (
    "port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


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
    dash, *chosen = free_ports(1 + len(PORT_FLAGS))
    ports = dict(zip(PORT_FLAGS, chosen, strict=True))
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
        stop_head(head)
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


JUNK_MIB = {
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so": 60,
    "runs/demo/sft/model/model.safetensors": 60,
    "myexp/checkpoints/iter_000001/policy/mp_rank_00_model_states.pt": 30,
    "trainers/__pycache__/cli.cpython-311.pyc": 1,
    ".git/objects/pack/pack-0.pack": 30,
}
"""What a user's checkout holds and a job must not carry (sparse files: sizes without disk): an
environment, run outputs in runs/ and in a ``--out`` made inside the repository, caches, history. Two of
them together are over Ray's 100 MiB job-upload limit, so a broken exclude also fails the submit."""


def working_copy(dest: Path) -> set[str]:
    """This checkout's files (tracked, or untracked and not ignored) copied to ``dest`` with the junk of
    :data:`JUNK_MIB` added; returns the copied files' relative paths (what the job should receive)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    files = {name for name in listed.stdout.splitlines() if (REPO / name).is_file()}
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    for name, size in JUNK_MIB.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        with open(dest / name, "wb") as f:
            f.truncate(size * 1024**2)
    return files


def submit(address: str, env: dict, job_id: str, working_dir: Path, entrypoint: list[str]):
    """``ray job submit --no-wait``, retried while the head's job agent is not yet up."""
    cmd = ["ray", "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(working_dir), "--", *entrypoint]  # fmt: skip
    for _ in range(30):  # the job API answers before its agent can take jobs ("No available agent")
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if "No available agent" not in result.stderr + result.stdout:
            return result
        time.sleep(3)
    return result


def test_ray_job_submit_runs_ppo_on_a_started_head(
    ray_head, world_dir, sft_model_dir, rm_model_dir, tmp_path
):
    """`ray job submit --working-dir` of a checkout that holds an environment, checkpoints and caches:
    the job's working directory on the head holds exactly the checkout's own files (what `rlhf
    upload-size` predicted), and `rlhf ppo` in it joins the cluster and reads its absolute data paths."""
    address, env, _ = ray_head
    work = tmp_path / "repo"
    source = working_copy(work)
    predicted = measure_upload(work)
    assert {name for name, _ in predicted.entries} == source
    out, manifest = tmp_path / "ppo", tmp_path / "uploaded.txt"
    job_id = f"rlhf-test-{secrets.token_hex(4)}"
    ppo = [
        "rlhf", "ppo", "--config", "trainers/configs/tiny.yaml", "--out", str(out),
        f"data.dir={world_dir}", f"model.path={sft_model_dir}", f"reward.path={rm_model_dir}",
        "ppo.iterations=1", "ppo.prompts_per_iteration=8", "ppo.samples_per_prompt=1", "ppo.ppo_epochs=1",
        "ppo.mini_batch_size=8", "ppo.micro_batch_size=4", "ppo.policy_workers=1", "ppo.checkpoint_every=0",
        "rollout.max_new_tokens=16",
    ]  # fmt: skip
    # `ray job submit` shell-quotes each word (shlex.join), so the listing of the directory the job runs
    # in (the unpacked upload) and of the code it imports is one `sh -c` script, before training.
    script = (
        f"find . -type f > {manifest} && pwd >> {manifest} && "
        f"python -c 'import trainers; print(trainers.__file__)' >> {manifest} && exec {shlex.join(ppo)}"
    )
    entrypoint = ["sh", "-c", script]
    result = submit(address, env, job_id, work, entrypoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is very large" not in result.stdout + result.stderr  # Ray's warning for a file of 10 MiB or more

    deadline, status = time.time() + 600, "PENDING"
    while status in ("PENDING", "RUNNING", "UNKNOWN") and time.time() < deadline:
        time.sleep(5)
        status = job_status(address, env, job_id)
    logs = subprocess.run(
        ["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True
    )
    assert status == "SUCCEEDED", logs.stdout[-4000:]

    *listing, cwd, imported = manifest.read_text().splitlines()
    uploaded = {line.removeprefix("./") for line in listing}
    assert uploaded == source, (sorted(uploaded - source)[:10], sorted(source - uploaded)[:10])
    assert Path(cwd) != work and "runtime_resources" in cwd, cwd  # Ray's unpacked copy on the head
    assert imported == f"{cwd}/trainers/__init__.py"  # the job runs the uploaded code (first on PYTHONPATH)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "objective/score" in metrics[0]
    assert (out / "model" / "config.json").exists()
    assert list((out / "model").glob("*.safetensors"))


def test_an_upload_over_the_limit_is_refused_by_ray_and_foretold_by_upload_size(ray_head, tmp_path):
    """The 100 MiB is the head's: Ray's job API (its dashboard's request limit) refuses a 101 MiB
    package, far below the GCS's 512 MiB; `rlhf upload-size` says so first, in one line."""
    address, env, _ = ray_head
    work = tmp_path / "big"
    (work / "data").mkdir(parents=True)
    with open(work / "data" / "shard-0.parquet", "wb") as f:
        f.truncate(101 * 1024**2)
    (work / "main.py").write_text("print('never runs')\n")
    size = subprocess.run(
        [sys.executable, "-m", "trainers.cli", "upload-size", str(work)], cwd=REPO, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert size.returncode == 2, size.stderr
    assert size.stderr.startswith("rlhf: error: ") and len(size.stderr.strip().splitlines()) == 1
    assert "data/shard-0.parquet (101.0 MiB)" in size.stderr and "100.0 MiB" in size.stderr

    result = submit(address, env, f"rlhf-big-{secrets.token_hex(4)}", work, ["python", "main.py"])
    said = result.stdout + result.stderr
    assert result.returncode != 0, said
    # Ray's client zips and sends it all; the head's answer arrives as a traceback ending in this line.
    assert "Request failed with status code 413: Maximum request body size 104857600 exceeded" in said, said[
        -3000:
    ]


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
