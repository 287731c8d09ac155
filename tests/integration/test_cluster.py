"""Placement groups and actor groups on a real local Ray (CPU): worlds, names, threads, infeasible requests."""

from __future__ import annotations

import os
import re
import sys

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from cluster.actor_group import ActorGroup, DistributedWorker
from cluster.placement import place_roles, release
from cluster.resources import detect_resources
from trainers.data.sharding import contiguous_bounds
from trainers.errors import UserError
from trainers.runtime.dist import backend_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
# Ray workers cannot import this test module by name: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Summer(DistributedWorker):
    """A minimal role: one tensor per rank, summed over the world."""

    def __init__(self, scale: float, offset: float = 0.0):
        self.scale, self.offset = scale, offset

    def all_reduce_rank(self) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([self.scale * (self.rank + 1) + self.offset])
        dist.all_reduce(t)
        return t.item()

    def facts(self) -> dict:
        import torch

        return {
            "rank": self.rank,
            "world": self.world_size,
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "threads": torch.get_num_threads(),
            "extra": os.environ.get("RLHF_TEST_ENV"),
        }

    def double(self, items: list[int]) -> list[int]:
        return [2 * x for x in items]


WAITING = re.compile(
    r"waiting for resources for role\(s\) policy: asked policy \{CPU: 1\}, available (?P<available>\{.*\})"
    r" \.\.\. timeout in (?P<left>\d+) s"
)
"""One line of the visible wait for the 1-CPU policy group (``every_s`` apart, until the timeout)."""


def live_groups() -> int:
    return sum(1 for g in placement_group_table().values() if g["state"] != "REMOVED")


def test_two_ranks_form_a_gloo_world_with_role_names(ray_local):
    placements = place_roles({"critic": [{"CPU": 1.0}] * 2}, colocated=False, timeout_s=60, name="t1")
    group = ActorGroup(
        Summer,
        placements["critic"],
        run_name="t1",
        init_args=(10.0,),
        rank_kwargs=lambda r: {"offset": r},
        env={"RLHF_TEST_ENV": "yes"},
        torch_threads=1,
        backend=backend_for("cpu"),
    )
    try:
        sums = ray.get(group.map(lambda actor, rank: actor.all_reduce_rank.remote()))
        assert sums == [10.0 * (1 + 2) + (0 + 1)] * 2  # every rank sees the world's sum
        facts = ray.get(group.map(lambda actor, rank: actor.facts.remote()))
        assert [f["rank"] for f in facts] == [0, 1] and {f["world"] for f in facts} == {2}
        assert {f["omp"] for f in facts} == {"1"} and {f["threads"] for f in facts} == {1}
        assert {f["extra"] for f in facts} == {"yes"}
        assert group.names == ["t1-critic-0", "t1-critic-1"]
        found = ray.get_actor("t1-critic-1")
        assert ray.get(found.facts.remote())["rank"] == 1
        shards = [list(range(5))[lo:hi] for lo, hi in contiguous_bounds(5, len(group))]
        halves = ray.get(group.map(lambda actor, rank: actor.double.remote(shards[rank])))
        assert halves == [[0, 2, 4], [6, 8]]  # rank r got part r
    finally:
        group.kill()
        release(placements)


def test_colocated_roles_share_one_placement_group(ray_local):
    placements = place_roles(
        {"policy": [{"CPU": 0.5}] * 2, "reference": [{"CPU": 0.5}]}, colocated=True, timeout_s=60, name="t2"
    )
    try:
        assert placements["policy"].group.id == placements["reference"].group.id
        assert placements["policy"].bundle_indices == [0, 1] and placements["reference"].bundle_indices == [0]
        table = placement_group_table(placements["policy"].group)
        assert [b["CPU"] for b in table["bundles"].values()] == [1.0, 0.5]  # bundle r = rank r of every role
    finally:
        release(placements)


def test_infeasible_request_fails_before_anything_starts(ray_local):
    before = live_groups()
    assert detect_resources().autoscaling is False  # a local Ray has no autoscaler
    with pytest.raises(UserError) as err:
        place_roles({"rollout": [{"GPU": 4.0, "CPU": 1.0}]}, colocated=False, timeout_s=60, name="t3")
    assert "'rollout'" in str(err.value) and "GPU: 4" in str(err.value)
    assert live_groups() == before


def test_busy_cluster_waits_visibly_then_times_out(ray_local):
    """How many waiting lines come depends on timing, so the test asks only for at least one, each
    saying what is asked and what is free, counting down to the timeout."""
    # Everything but half a CPU is taken (once earlier tests' actors are gone): 1 CPU fits the
    # cluster on paper but not now.
    hog = placement_group([{"CPU": ray.cluster_resources()["CPU"] - 0.5}], strategy="PACK")
    ray.get(hog.ready(), timeout=60)
    messages = []
    try:
        before = live_groups()
        with pytest.raises(UserError, match="timed out after 2.5 s waiting for resources for role.s. policy"):
            place_roles(
                {"policy": [{"CPU": 1.0}]},
                colocated=False,
                timeout_s=2.5,
                name="t4",
                notify=messages.append,
                every_s=1.0,
            )
        assert live_groups() == before  # the waiting group was removed
        lines = [WAITING.fullmatch(m) for m in messages]
        assert lines and all(lines), messages
        for line in lines:
            cpu = re.search(r"\bCPU: ([0-9.e+-]+)", line["available"])
            assert cpu is None or float(cpu[1]) < 1.0, line[0]  # what is free cannot hold the request
        countdown = [int(line["left"]) for line in lines]
        assert countdown == sorted(countdown, reverse=True) and countdown[0] < 2.5, messages
    finally:
        remove_placement_group(hog)


def test_waiting_for_an_actor_that_does_not_answer_says_so_and_gives_up(ray_local):
    """``wait_until_alive`` (a lost engine's wait for its restart, which may need a node to come back)
    reports every ``every_s`` while nothing answers and stops at its timeout; an answer ends it."""
    import time

    from cluster.liveness import ActorGone, wait_until_alive

    @ray.remote(num_cpus=0)
    def answer(delay: float) -> str:
        time.sleep(delay)
        return "ok"

    waited: list[float] = []
    start = time.monotonic()
    with pytest.raises(ActorGone, match="no answer within 3s"):
        wait_until_alive(lambda: answer.remote(30.0), timeout_s=3.0, notify=waited.append, every_s=1.0)
    assert 2.9 <= time.monotonic() - start < 30  # gave up at its timeout, before the answer came
    assert len(waited) >= 2 and waited == sorted(waited) and waited[0] >= 1.0
    assert wait_until_alive(lambda: answer.remote(0.0), timeout_s=30.0, notify=waited.append) == "ok"


COLOCATED_PROBE = """
import json, ray
from cluster.placement import place_roles, release
from tests.unit.test_resources import colocated_config
from trainers.ppo.setup import ppo_bundles

ray.init(num_cpus=6, num_gpus=2, include_dashboard=False, log_to_driver=False)

@ray.remote
class Probe:
    def gpus(self):
        return [str(g) for g in ray.get_gpu_ids()]

placements = place_roles(ppo_bundles(colocated_config(2), gpu=True), colocated=True, timeout_s=60, name="c")
probes = {
    (role, rank): Probe.options(**p.actor_options(rank)).remote()
    for role, p in placements.items() for rank in range(p.num_ranks)
}
gpus = dict(zip(probes, ray.get([a.gpus.remote() for a in probes.values()])))
groups = {p.group.id.hex() for p in placements.values()}
print(json.dumps({"groups": len(groups), "gpus": {f"{r}:{k}": g for (r, k), g in gpus.items()}}))
release(placements)
"""
"""A driver with its own local Ray declaring 2 logical GPUs on this CPU machine: the colocated plan of a GAE
run with an RM (2 ranks of each role, 2 engines), one probe actor per rank placed as the PPO roles are."""


def test_colocated_roles_land_one_rank_of_each_and_one_engine_per_gpu():
    """Ray itself assigns the (logical) GPUs: rank r of policy, critic, reference, reward and engine r all
    get GPU r of one placement group, and the two ranks get different GPUs. No vLLM or DeepSpeed starts."""
    import json
    import subprocess

    from tests.conftest import REPO, subprocess_env

    proc = subprocess.run(
        [sys.executable, "-c", COLOCATED_PROBE],
        env=subprocess_env(own_ray=True),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["groups"] == 1
    gpus = found["gpus"]
    roles = ("policy", "critic", "reference", "reward", "rollout")
    assert sorted(gpus) == sorted(f"{role}:{rank}" for role in roles for rank in (0, 1))
    assert all(len(ids) == 1 for ids in gpus.values())  # a share of one GPU each
    by_rank = [{gpus[f"{role}:{rank}"][0] for role in roles} for rank in (0, 1)]
    assert [len(ids) for ids in by_rank] == [1, 1] and by_rank[0] != by_rank[1]
