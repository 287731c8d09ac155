"""PPO on a Ray cluster of several nodes, and what happens when a node goes (issue 16).

One machine, real Ray: ``ray.cluster_utils.Cluster`` starts a head and worker nodes, each a raylet of
its own with its own resources, exactly as separate machines would join (they only share this disk,
which stands in for the shared filesystem a multi-node run needs for ``--out`` and the model paths).
``cluster.role_resources`` pins each role to the nodes offering a custom resource, so the layout is
known and a node can be killed knowing what runs on it:

| node | resources | hosts |
|---|---|---|
| head | no CPU | nothing (GCS only; the drivers join it) |
| ``policy`` | 2 CPU, ``rlhf_policy: 2`` | the 2 policy ranks (one ZeRO-3 world) |
| ``aux`` | 3 CPU, ``rlhf_aux: 3`` | critic, reference, reward model |
| ``engine`` x 2 | 1 CPU, ``rlhf_engine: 1`` | the vLLM engine, and a spare |

``rlhf ppo`` runs as a subprocess joining the head, like a user's driver. Killing a node is
``Cluster.remove_node(allow_graceful=False)``: its raylet and every worker process on it are SIGKILLed.
The session's uninterrupted run (``ppo_reference``, conftest.py) is the yardstick for the metrics: the
layout is metric-neutral, so a run that lost a node and recovered (or stopped and resumed) must log the
same numbers (non-timing keys, rel 1e-6 / abs 1e-9, as the other fault tests).

The head's GCS checks node health every second and declares a node dead after 3 missed checks (Ray's
defaults: 3 s and 5), so a lost node is noticed in seconds rather than tens of seconds.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, free_port
from tests.integration.cluster_runs import (
    assert_same_metrics,
    finish,
    our_line,
    own_ports,
    placed,
    rows,
    start,
    wait_for,
)
from tests.integration.conftest import ppo_inputs, reference_variant

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

ITERATIONS = 3
NODE_TYPES = {
    "policy": {"num_cpus": 2, "resources": {"rlhf_policy": 2}},
    "aux": {"num_cpus": 3, "resources": {"rlhf_aux": 3}},
    "engine": {"num_cpus": 1, "resources": {"rlhf_engine": 1}},
}
ROLE_RESOURCES = '{policy: {rlhf_policy: 1}, rollout: {rlhf_engine: 1}, "*": {rlhf_aux: 1}}'
"""``cluster.role_resources`` for :data:`NODE_TYPES`: policy, engines, and everything else on ``aux``."""


class LocalCluster:
    """A head and named worker nodes on this machine (``ray.cluster_utils.Cluster``), torn down by
    :meth:`shutdown` (SIGKILL of exactly its processes; never ``ray stop``)."""

    def __init__(self, tmp: str):
        from ray.cluster_utils import Cluster

        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        self._saved_current = current.read_text() if current.is_file() else None
        self._current = current
        self.cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "gcs_server_port": free_port(),
                "temp_dir": tmp,
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
                **own_ports(),
            },
        )
        self.nodes: dict[str, list] = {}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, kind: str):
        node = self.cluster.add_node(**NODE_TYPES[kind], **own_ports())
        self.nodes.setdefault(kind, []).append(node)
        return node

    def kind_of(self, node_id: str) -> str:
        """``'policy'``/``'aux'``/``'engine'`` for a (prefix of a) node id; KeyError if none matches."""
        for kind, nodes in self.nodes.items():
            if any(n.node_id.startswith(node_id) for n in nodes):
                return kind
        raise KeyError(node_id)

    def node(self, node_id: str):
        return next(n for nodes in self.nodes.values() for n in nodes if n.node_id.startswith(node_id))

    def kill(self, node) -> None:
        """SIGKILL the node's raylet and workers, as a machine that powers off."""
        self.cluster.remove_node(node, allow_graceful=False)
        for nodes in self.nodes.values():
            if node in nodes:
                nodes.remove(node)

    def actors(self) -> dict[str, dict]:
        """Ray's actor table (from the GCS): actor name -> its record (``Address.NodeID``, ``NumRestarts``)."""
        table = self.cluster.global_state.actor_table(None)
        return {a["Name"]: a for a in table.values() if a.get("Name")}

    def shutdown(self) -> None:
        self.cluster.shutdown()
        # Cluster() wrote its address as this machine's "current cluster" (what ray.init("auto") joins).
        if self._saved_current is None:
            self._current.unlink(missing_ok=True)
        else:
            self._current.write_text(self._saved_current)


@pytest.fixture(scope="module")
def cluster():
    """Head + policy + aux + two engine nodes, shared by this module's tests (test 1 kills one engine node)."""
    tmp = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    local = LocalCluster(tmp)
    try:
        for kind in ("policy", "aux", "engine", "engine"):
            local.add(kind)
        yield local
    finally:
        local.shutdown()


def ppo_command(out: Path, inputs: list[str], address: str, *extra: str) -> list[str]:
    overrides = reference_variant(
        [f"ppo.iterations={ITERATIONS}", "ppo.checkpoint_every=1", "ppo.max_engine_restarts=2",
         f"cluster.ray_address={address}", f"cluster.role_resources={ROLE_RESOURCES}", *extra]
    )  # fmt: skip
    return [sys.executable, "-m", "trainers.cli", "ppo", "--config", str(TINY_CONFIG), "--out", str(out),
            *inputs, *overrides]  # fmt: skip


def test_roles_spread_over_nodes_and_a_lost_engine_node_moves_to_the_spare(
    cluster, world_dir, sft_model_dir, rm_model_dir, ppo_reference, tmp_path
):
    """The roles land where ``cluster.role_resources`` puts them (start-up lines = Ray's actor table); the
    node hosting the vLLM engine is killed after iteration 1: Ray moves the engine's bundle to the spare
    engine node and restarts it there, the driver pushes the current weights and redoes the phase, and
    the run ends with the uninterrupted run's metrics."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(ppo_command(out, ppo_inputs(world_dir, sft_model_dir, rm_model_dir), cluster.address), log)
    wait_for(proc, log, lambda: len(rows(out)) >= 1, "iteration 1")

    layout = placed(log.read_text())
    assert sorted(layout) == ["critic", "policy", "reference", "reward", "rollout"], layout
    kinds = {role: {cluster.kind_of(node) for node in nodes} for role, nodes in layout.items()}
    assert kinds == {"policy": {"policy"}, "critic": {"aux"}, "reference": {"aux"}, "reward": {"aux"},
                     "rollout": {"engine"}}, kinds  # fmt: skip
    assert len(layout["policy"]) == 2 and len({n for nodes in layout.values() for n in nodes}) == 3
    run_name = next(n.rsplit("-", 2)[0] for n in cluster.actors() if n.endswith("-policy-0"))
    table = cluster.actors()
    for role, nodes in layout.items():  # what the run printed is where Ray says each actor lives
        for rank, node in enumerate(nodes):
            assert table[f"{run_name}-{role}-{rank}"]["Address"]["NodeID"].startswith(node), (role, rank)

    engine_node = cluster.node(layout["rollout"][0])
    spare = next(n for n in cluster.nodes["engine"] if n is not engine_node)
    killed_at = time.time()
    cluster.kill(engine_node)
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]

    lost = [line for line in text.splitlines() if "rollout engine 0 lost during" in line]
    back = re.search(r"ppo: rollout engine 0 is back after ([0-9.]+)s on node ([0-9a-f]+) ", text)
    assert len(lost) == 1 and back, text[-3000:]
    assert spare.node_id.startswith(back.group(2))  # the spare node took the engine
    engine = cluster.actors()[f"{run_name}-rollout-0"]
    assert engine["NumRestarts"] == 1 and engine["Address"]["NodeID"] == spare.node_id
    records = rows(out)
    assert sum(r["rollout/engine_restarts"] for r in records) == 1.0
    assert_same_metrics(records, ppo_reference.records[:ITERATIONS])
    print(f"\nengine node killed; engine back after {back.group(1)} s; run ended {time.time() - killed_at:.1f} s "
          f"after the kill")  # fmt: skip


def test_a_lost_policy_node_stops_the_run_and_the_same_command_resumes_once_a_node_is_back(
    cluster, world_dir, sft_model_dir, rm_model_dir, ppo_reference, tmp_path
):
    """The node of both policy ranks is killed once the iteration-1 checkpoint exists: one ``rlhf: stopped:``
    line, exit 3. Rerun while no node can host the policy: one exit-2 line at once (no autoscaler), or,
    with ``cluster.autoscaling=true``, the placement wait says what it waits for and gives up at its
    timeout (exit 2). A new policy node joins; the same command resumes from the
    checkpoint and ends with the uninterrupted run's metrics."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    cmd = ppo_command(out, ppo_inputs(world_dir, sft_model_dir, rm_model_dir), cluster.address)
    proc = start(cmd, log)
    checkpoint = out / "checkpoints" / "iter_000001"
    wait_for(proc, log, checkpoint.is_dir, "the iteration-1 checkpoint")
    cluster.kill(cluster.nodes["policy"][0])
    code, text = finish(proc, log)
    assert code == 3, text[-3000:]
    line = our_line(text)
    assert line.startswith("rlhf: stopped: policy rank") and str(checkpoint) in line, line

    at_once, waits = tmp_path / "at-once.log", tmp_path / "wait.log"
    code, text = finish(start(cmd, at_once), at_once)  # no node can host a policy rank, none will come
    assert code == 2, text[-3000:]
    line = our_line(text)
    assert line.startswith(
        "rlhf: error: role 'policy' needs {CPU: 1, rlhf_policy: 1} per actor, but no node"
    ), line
    assert "memory" not in line and "node:" not in line, line  # Ray's bookkeeping resources are left out
    autoscaled = [*cmd, "cluster.autoscaling=true", "cluster.placement_timeout_s=5"]
    code, text = finish(start(autoscaled, waits), waits)  # one may come: wait, say for what, give up in time
    assert code == 2, text[-3000:]
    assert "waiting for resources for role(s) policy: asked policy {CPU: 2, rlhf_policy: 2}" in text, text[
        -3000:
    ]
    line = our_line(text)
    assert line.startswith("rlhf: error: timed out after 5 s waiting for resources for role(s) policy"), line
    assert "_group_" not in line, line  # nor placement groups' copies of CPU
    assert checkpoint.is_dir() and len(rows(out)) >= 1  # nothing written was lost

    cluster.add("policy")
    started, resumed = time.time(), tmp_path / "resumed.log"
    code, text = finish(start(cmd, resumed), resumed)
    assert code == 0, text[-3000:]
    assert f"ppo: resumed from {checkpoint} (iteration 1)" in text, text[-3000:]
    assert_same_metrics(rows(out), ppo_reference.records[:ITERATIONS])
    print(f"\npolicy node killed -> exit 3; resumed run took {time.time() - started:.1f} s")
