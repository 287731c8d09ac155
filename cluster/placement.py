"""Placement groups for the PPO roles, and the visible wait while the cluster finds (or grows) room.

    bundles = role_bundles(requests, gpu=gpu)           # cluster/resources.py
    placements = place_roles(bundles, colocated=False, timeout_s=600)
    ActorGroup(PolicyActor, placements["policy"], ...)   # cluster/actor_group.py

Dedicated: one placement group per role (``PACK``: ranks of one role close together, e.g. one ZeRO-3
world on one node when it fits). Colocated: one shared group whose bundle r holds rank r of every role;
each actor then takes its own fraction of that bundle.

Infeasible requests never get here: :func:`place_roles` calls ``check_feasible`` first, so "4 GPUs on
a 1-GPU cluster" is a one-line error before anything waits or starts.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.resources import (
    Bundle,
    ClusterResources,
    check_feasible,
    colocated_bundles,
    detect_resources,
    format_resources,
    sum_bundles,
)
from trainers.errors import UserError

NOTIFY_EVERY_S = 10.0
FIRST_NOTICE_S = 2.0
"""A group not placed this soon is waiting for something (busy nodes, an autoscaler's launch): say so
then, not only after the first ``NOTIFY_EVERY_S``."""


@dataclasses.dataclass
class RolePlacement:
    """Where the ranks of one role go: a placement group, a bundle index and the resources per rank."""

    role: str
    group: PlacementGroup
    bundle_indices: list[int]
    resources: list[Bundle]
    """What each rank's actor reserves inside its bundle (``num_cpus``/``num_gpus``/custom)."""

    @property
    def num_ranks(self) -> int:
        """Number of actors of this role."""
        return len(self.bundle_indices)

    def actor_options(self, rank: int) -> dict:
        """``ActorClass.options(...)`` keyword arguments that pin rank ``rank`` to its bundle."""
        res = dict(self.resources[rank])
        options = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0)}
        if res:
            options["resources"] = res
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.bundle_indices[rank]
        )
        return options


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def wait_ready(
    groups: Mapping[str, PlacementGroup],
    asked: Mapping[str, Bundle],
    timeout_s: float,
    autoscaling: bool,
    notify: Callable[[str], None] = _stderr,
    every_s: float = NOTIFY_EVERY_S,
) -> None:
    """Block until every group is placed; say what is missing after :data:`FIRST_NOTICE_S`, then every
    ``every_s`` seconds.

    On timeout, removes the groups and raises a one-line UserError naming the roles still waiting.
    """
    pending = {role: group.ready() for role, group in groups.items()}
    deadline = time.monotonic() + timeout_s
    wait_s = min(FIRST_NOTICE_S, every_s)
    while pending:
        left = deadline - time.monotonic()
        ready, _ = ray.wait(
            list(pending.values()), num_returns=len(pending), timeout=max(0.0, min(wait_s, left))
        )
        wait_s = every_s
        pending = {role: ref for role, ref in pending.items() if ref not in ready}
        if not pending:
            return
        left = deadline - time.monotonic()
        what = _waiting_text({r: asked[r] for r in pending})
        if left <= 0:
            for group in groups.values():
                remove_placement_group(group)
            raise UserError(
                f"timed out after {timeout_s:g} s {what} (raise cluster.placement_timeout_s or free resources)"
            )
        maybe = " (autoscaler may add nodes)" if autoscaling else ""
        notify(f"{what}{maybe} ... timeout in {left:.0f} s")


def _waiting_text(pending: Mapping[str, Bundle]) -> str:
    """'waiting for resources for role(s) X: asked {...}, available {...}' (one line)."""
    asked = "; ".join(f"{role} {format_resources(b)}" for role, b in pending.items())
    available = format_resources(ray.available_resources())
    return f"waiting for resources for role(s) {', '.join(pending)}: asked {asked}, available {available}"


def place_roles(
    bundles: Mapping[str, list[Bundle]],
    colocated: bool,
    timeout_s: float,
    name: str = "rlhf",
    cluster: ClusterResources | None = None,
    notify: Callable[[str], None] = _stderr,
    every_s: float = NOTIFY_EVERY_S,
) -> dict[str, RolePlacement]:
    """Check feasibility, create the placement group(s), wait for them; one :class:`RolePlacement` per role.

    ``bundles``: one bundle per rank per role (:func:`cluster.resources.role_bundles`). Roles with no
    ranks are skipped. ``name`` prefixes the groups' names (visible in the Ray dashboard).
    """
    bundles = {role: list(b) for role, b in bundles.items() if b}
    cluster = cluster or detect_resources()
    check_feasible(bundles, cluster, colocated=colocated)
    if colocated:
        shared = colocated_bundles(bundles)
        group = placement_group(shared, strategy="PACK", name=f"{name}-colocated")
        key = f"{', '.join(bundles)} (colocated)"
        wait_ready({key: group}, {key: sum_bundles(shared)}, timeout_s, cluster.autoscaling, notify, every_s)
        return {role: RolePlacement(role, group, list(range(len(b))), b) for role, b in bundles.items()}
    groups = {role: placement_group(b, strategy="PACK", name=f"{name}-{role}") for role, b in bundles.items()}
    asked = {role: sum_bundles(b) for role, b in bundles.items()}
    wait_ready(groups, asked, timeout_s, cluster.autoscaling, notify, every_s)
    return {role: RolePlacement(role, groups[role], list(range(len(b))), b) for role, b in bundles.items()}


def release(placements: Mapping[str, RolePlacement]) -> None:
    """Remove the placement groups (each once, also when roles share one)."""
    seen = set()
    for placement in placements.values():
        if placement.group.id not in seen:
            seen.add(placement.group.id)
            remove_placement_group(placement.group)


def bundle_nodes(placement: RolePlacement) -> list[str]:
    """Hex id of the node each rank's bundle was placed on ('' while a bundle is unplaced)."""
    table = ray.util.placement_group_table(placement.group)
    where = table.get("bundles_to_node_id", {})
    return [where.get(index, "") or "" for index in placement.bundle_indices]


def node_names() -> dict[str, str]:
    """Node hex id -> ``'<id prefix> (<ip>)'``: how start-up and recovery lines name a node. The prefix is
    12 hex digits, longer where that would not tell two nodes apart (Ray's fake multi-node provider
    numbers its nodes ``fff...f00001``, ``fff...f00002``)."""
    nodes = ray.nodes()
    ids = [n["NodeID"] for n in nodes]
    width = next((w for w in range(12, 57) if len({i[:w] for i in ids}) == len(set(ids))), 56)
    return {n["NodeID"]: f"{n['NodeID'][:width]} ({n['NodeManagerAddress']})" for n in nodes}


def placement_lines(placements: Mapping[str, RolePlacement]) -> list[str]:
    """One line per role saying which node holds each rank, e.g. ``policy: rank 0 -> 1a2b3c4d5e6f
    (10.0.0.5), rank 1 -> ...``: on a multi-node cluster, where to look when a node goes."""
    names = node_names()
    lines = []
    for role, placement in placements.items():
        ranks = ", ".join(
            f"rank {rank} -> {names.get(node, node[:12] or 'unplaced')}"
            for rank, node in enumerate(bundle_nodes(placement))
        )
        lines.append(f"{role}: {ranks}")
    return lines
