"""Ray's own autoscaler grows a cluster for a PPO run and shrinks it after (issue 16).

ray_cluster.yaml's launchable node types become node types of Ray's fake multi-node provider
(:func:`cluster.node_types.fake_cluster_config`: the ``gpu_worker`` type keeps its name and
``max_workers: 2``, its 8 GPUs become ``gpu_standin: 8`` and its 192 CPUs become :data:`CPUS_PER_NODE`).
A head with no CPU starts with that file as its ``--autoscaling-config`` and ``RAY_FAKE_CLUSTER=1``: its
monitor runs Ray's autoscaler with the fake provider, which launches worker raylets as processes on this
machine and removes them when idle -- real Ray, real autoscaler, no cloud.

Every role asks for ``gpu_standin: 1`` (``cluster.role_resources``), as on the real cluster every role asks
for a GPU the CPU head lacks, so nothing runs until the autoscaler adds ``gpu_worker`` nodes. The six
actors of the tiny run (2 policy ranks, critic, reference, reward model, engine; 1 CPU each) need two
nodes of :data:`CPUS_PER_NODE`, whatever order their groups are placed in.

The head runs with ``--block`` in its own process group, and the fake provider starts its worker raylets
from the head's monitor, in that group: killing the group ends exactly this cluster (never ``ray stop``).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from cluster.node_types import FAKE_HEAD_TYPE, fake_cluster_config
from tests.conftest import REPO, TINY_CONFIG, free_ports
from tests.integration.cluster_runs import (
    assert_same_metrics,
    finish,
    our_line,
    placed,
    rows,
    start,
    stop_head,
)
from tests.integration.conftest import ppo_inputs, reference_variant

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ITERATIONS = 2
CPUS_PER_NODE = 4
IDLE_TIMEOUT_MINUTES = 0.1
"""Six seconds idle and a node goes (the file's 10 minutes suit a cloud bill, not a test)."""
HEAD_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


class AutoscalingHead:
    """A head running Ray's autoscaler over the fake multi-node provider, from ray_cluster.yaml, with token
    authentication on and its own token: the head, the nodes its monitor launches and every driver the test
    starts share one explicit mode and token (Ray 2.60 decides the mode per process otherwise: ``ray start
    --head`` turns it on when ``~/.ray/auth_token`` exists, a local ``ray.init()`` creates that file, and a
    driver whose mode differs from the head's has its actors destroyed as soon as they register)."""

    def __init__(self, tmp: Path):
        from ray._private.services import resolve_ip_for_localhost

        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        self._current, self._saved = current, current.read_text() if current.is_file() else None
        port, *service_ports = free_ports(1 + len(HEAD_PORT_FLAGS))
        self.address = f"{resolve_ip_for_localhost('127.0.0.1')}:{port}"
        real = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
        config = fake_cluster_config(
            real,
            gcs_address=self.address,
            cpus_per_node=CPUS_PER_NODE,
            idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
        )
        self.config_path = tmp / "autoscaler.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.worker_types = {k: v for k, v in config["available_node_types"].items() if k != FAKE_HEAD_TYPE}
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", **self.auth)
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env['PATH']}"
        self.env.pop("RAY_ADDRESS", None)
        cmd = ["ray", "start", "--head", "--block", f"--port={port}", f"--autoscaling-config={self.config_path}",
               "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats",
               *(f"--{flag}={p}" for flag, p in zip(HEAD_PORT_FLAGS, service_ports, strict=True))]  # fmt: skip
        self.log = tmp / "head.log"
        with open(self.log, "w") as sink:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )

    def status(self) -> str:
        """``ray status``: the autoscaler's own report (active and pending nodes by type)."""
        done = subprocess.run(
            ["ray", "status", "--address", self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout if done.returncode == 0 else ""

    def active_workers(self) -> int:
        """Live ``gpu_worker`` nodes, as the autoscaler counts them."""
        text = self.status()
        active = text.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in text else ""
        return sum(int(n) for n in re.findall(r"^\s*(\d+) gpu_worker$", active, re.M))

    def launched_raylets(self) -> int:
        """Worker raylets of this head's process group alive now: the nodes the fake provider launched
        (each raylet carries its node id in ``RAY_OVERRIDE_NODE_ID_FOR_TESTING``). Read from /proc, so the
        test can watch the run every half second without a ``ray status`` process (a whole Ray client,
        ~1 s of CPU) competing with the run's actors for the machine's 2 cores."""
        import psutil

        ids = set()
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "raylet" and os.getpgid(proc.pid) == self.proc.pid:
                    node_id = proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
                    if node_id and node_id != FAKE_HEAD_NODE_ID:
                        ids.add(node_id)
            except (psutil.Error, ProcessLookupError):
                continue
        return len(ids)

    def wait_up(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while "Active:" not in self.status():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, f"the head did not come up in {timeout_s:.0f} s"
            time.sleep(1)

    def shutdown(self) -> None:
        stop_head(self.proc)
        if self._saved is None:
            self._current.unlink(missing_ok=True)
        else:
            self._current.write_text(self._saved)


@pytest.fixture(scope="module")
def head():
    tmp = Path(tempfile.mkdtemp(prefix="as", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    local = AutoscalingHead(tmp)
    try:
        local.wait_up()
        yield local
    finally:
        local.shutdown()


def ppo_command(out: Path, inputs: list[str], head: AutoscalingHead, standins: int) -> list[str]:
    overrides = reference_variant(
        [f"ppo.iterations={ITERATIONS}", f"cluster.ray_address={head.address}", "cluster.autoscaling=true",
         f"cluster.autoscaler_config={head.config_path}", "cluster.placement_timeout_s=300",
         f'cluster.role_resources={{"*": {{gpu_standin: {standins}}}}}']
    )  # fmt: skip
    return [sys.executable, "-m", "trainers.cli", "ppo", "--config", str(TINY_CONFIG), "--out", str(out),
            *inputs, *overrides]  # fmt: skip


def test_the_yaml_node_types_are_what_the_autoscaler_runs(head):
    """The local types are ray_cluster.yaml's: same names and max_workers, GPUs as the stand-in."""
    real = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["available_node_types"]
    assert set(head.worker_types) == {"gpu_worker"}
    assert head.worker_types["gpu_worker"]["max_workers"] == real["gpu_worker"]["max_workers"] == 2
    assert head.worker_types["gpu_worker"]["resources"] == {
        "CPU": CPUS_PER_NODE,
        "gpu_standin": real["gpu_worker"]["resources"]["GPU"],
    }
    assert head.active_workers() == 0  # 0 workers at start


def test_a_request_no_node_type_can_hold_fails_at_once(
    head, world_dir, sft_model_dir, rm_model_dir, tmp_path
):
    """9 stand-in GPUs per actor: no node type has 9, so the driver says so in one exit-2 line before any
    placement group exists (without the YAML it would wait for the placement timeout), and the autoscaler
    launches nothing."""
    log = tmp_path / "run.log"
    inputs = ppo_inputs(world_dir, sft_model_dir, rm_model_dir)
    code, text = finish(start(ppo_command(tmp_path / "run", inputs, head, standins=9), log, **head.auth), log)
    assert code == 2, text[-3000:]
    line = our_line(text)
    assert line.startswith("rlhf: error: role '") and "needs {CPU: 1, gpu_standin: 9} per actor" in line, line
    assert "{CPU: 4, gpu_standin: 8}" in line, line  # the node type it was measured against
    assert "waiting for resources" not in text
    assert head.active_workers() == 0


def test_the_autoscaler_adds_nodes_for_the_run_and_removes_them_after(
    head, world_dir, sft_model_dir, rm_model_dir, ppo_reference, tmp_path
):
    """From 0 workers: the run says what it waits for, the autoscaler launches two ``gpu_worker`` nodes, the
    roles land on them, the run ends with the uninterrupted run's metrics, and the idle nodes are removed."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    started = time.time()
    inputs = ppo_inputs(world_dir, sft_model_dir, rm_model_dir)
    proc = start(ppo_command(out, inputs, head, standins=1), log, **head.auth)
    counts: list[tuple[float, int]] = []  # (seconds after the start, launched gpu_worker raylets)
    while proc.poll() is None and time.time() - started < 600:
        counts.append((time.time() - started, head.launched_raylets()))
        time.sleep(0.5)
    code, text = finish(proc, log)
    ended = time.time()
    assert code == 0, text[-3000:]
    assert "waiting for resources for role(s)" in text and "(autoscaler may add nodes)" in text, text[-3000:]
    assert counts[0][1] == 0 and max(n for _, n in counts) == 2, counts  # 2 nodes of 4 CPUs for 6 actors
    layout = placed(text)
    hosts = {node for nodes in layout.values() for node in nodes}
    assert sorted(layout) == ["critic", "policy", "reference", "reward", "rollout"], layout
    assert len(hosts) == 2 and FAKE_HEAD_NODE_ID not in hosts, hosts  # both launched nodes, not the head
    assert_same_metrics(rows(out), ppo_reference.records[:ITERATIONS])

    deadline = time.time() + 180
    while head.active_workers() and time.time() < deadline:
        time.sleep(1)
    assert head.active_workers() == 0, "the idle nodes were not removed within 180 s"
    assert head.launched_raylets() == 0  # their raylets are gone too
    first = next(t for t, n in counts if n >= 1)
    both = next(t for t, n in counts if n >= 2)
    print(f"\nfirst node up {first:.1f} s, second {both:.1f} s after the start; run took {ended - started:.1f} s; "
          f"idle nodes gone {time.time() - ended:.1f} s after it ended")  # fmt: skip
