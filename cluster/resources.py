"""What the cluster has and what each role asks for; pure functions except :func:`detect_resources`.

A *bundle* is a Ray resource dict (``{"GPU": 1, "CPU": 1}``). :func:`role_bundles` gives one bundle
per rank (actor) of every role, from plain values (ranks and GPUs per rank of each role, CPUs per actor,
the placement mode) -- this module knows roles by name only, not what they do:

| placement | GPU cluster | CPU-only cluster |
|---|---|---|
| dedicated | ``gpus_per_rank`` GPUs per rank (1; a tensor-parallel engine more) | ``cpus_per_actor`` CPUs per actor |
| colocated | every role's rank r shares GPU r: a GPU fraction each (vLLM sleeps while others train) | same as dedicated |

:func:`check_feasible` turns a request that can never be met (more GPUs than the cluster has and no
autoscaler that could add them, or one bundle larger than any node) into a one-line
:class:`~trainers.errors.UserError` before any actor starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

from trainers.errors import UserError

Bundle = dict[str, float]
EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class ClusterResources:
    """Totals now, per-node shapes, and (with an autoscaler) the most the cluster can grow to."""

    total: dict[str, float]
    """Resources of the live nodes together (``ray.cluster_resources()``)."""
    node_shapes: list[dict[str, float]]
    """Resources of each live node and of each node type an autoscaler may add."""
    max_total: dict[str, float] | None = None
    """Largest totals the autoscaler may reach; None when no autoscaler is known."""
    unbounded: bool = False
    """An autoscaler is assumed (the user says so) but its limits are unknown: nothing is infeasible."""

    @property
    def autoscaling(self) -> bool:
        """Whether an autoscaler may add nodes."""
        return self.max_total is not None or self.unbounded

    def limit(self, resource: str) -> float:
        """The most of ``resource`` the cluster can ever offer (now, or after autoscaling)."""
        if self.unbounded:
            return math.inf
        source = self.max_total if self.max_total is not None else self.total
        return max(source.get(resource, 0.0), self.total.get(resource, 0.0))


def detect_resources(assume_autoscaling: bool = False, autoscaler_config: str = "") -> ClusterResources:
    """Read the connected Ray cluster: live nodes, and the node types an autoscaler may add.

    The types come from the cluster config an autoscaler published to the GCS (Ray Train reads the same
    record for the same check), else from the autoscaler's cluster YAML (``autoscaler_config``, as
    ``cluster.autoscaler_config``: cluster/node_types.py), either giving known limits.
    ``assume_autoscaling`` covers an autoscaler known by neither: limits are then unknown and only the
    placement timeout bounds a request. Otherwise ``max_total = None``.
    """
    import ray
    from ray._private.state import state

    from cluster.node_types import addable_limits, find_autoscaler_config, load_cluster_yaml

    live = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [dict(n["Resources"]) for n in live]
    max_total = None
    config = state.get_cluster_config()
    yaml_path = find_autoscaler_config(autoscaler_config)
    if config is not None and config.node_group_configs:
        max_total = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
        nodes += [
            {k: float(v) for k, v in g.resources.items()}
            for g in config.node_group_configs
            if g.max_count != 0
        ]
    elif yaml_path is not None and (limits := addable_limits(load_cluster_yaml(yaml_path))) is not None:
        shapes, most = limits
        head = next((dict(n["Resources"]) for n in live if "node:__internal_head__" in n["Resources"]), {})
        max_total = {k: head.get(k, 0.0) + most.get(k, 0.0) for k in {*head, *most}}
        nodes += shapes
    return ClusterResources(
        total=dict(ray.cluster_resources()),
        node_shapes=nodes,
        max_total=max_total,
        unbounded=assume_autoscaling and max_total is None,
    )


def use_gpu(device: str, cluster: ClusterResources) -> bool:
    """Resolve ``cluster.device`` ('auto', 'cpu', 'cuda'); 'cuda' without any GPU is a user error."""
    if device == "cpu":
        return False
    known = cluster.max_total if cluster.max_total is not None else cluster.total
    has_gpu = max(known.get("GPU", 0.0), cluster.total.get("GPU", 0.0)) > 0
    if device == "cuda" and not has_gpu:
        raise UserError(
            "cluster.device=cuda but the Ray cluster has no GPU and no autoscaler that can add one"
        )
    return has_gpu


@dataclasses.dataclass(frozen=True)
class RoleRequest:
    """What one role asks of the cluster: its number of ranks (actors) and, on a GPU cluster, the GPUs
    each rank holds (a tensor-parallel vLLM engine holds several; 0: a CPU-only actor such as a reward
    function worker: CPU only, never a GPU share; colocated placement adds it to the shared bundle of its rank)."""

    ranks: int
    gpus_per_rank: int = 1


def role_bundles(
    roles: Mapping[str, RoleRequest],
    *,
    gpu: bool,
    placement: str = "dedicated",
    cpus_per_actor: float = 1.0,
    extra: Mapping[str, Bundle] | None = None,
) -> dict[str, list[Bundle]]:
    """One bundle per rank of every role (module docstring's table).

    ``placement`` 'dedicated' gives each GPU rank its own ``gpus_per_rank`` GPUs; 'colocated' puts rank r of
    every role on shared GPU r, each taking an equal fraction of it (so every rank must ask for one GPU).
    On a CPU-only cluster every actor gets ``cpus_per_actor`` CPUs whatever the placement. ``extra``: custom
    resources each actor of a role also reserves (key ``'*'``: every role not named), which pins roles
    to the nodes offering them.
    """
    bundles = _base_bundles(roles, gpu=gpu, placement=placement, cpus_per_actor=cpus_per_actor)
    extra = extra or {}
    for role, role_list in bundles.items():
        add = extra.get(role, extra.get("*", {}))
        for bundle in role_list:
            bundle.update({k: float(v) for k, v in add.items()})
    return bundles


def _base_bundles(
    roles: Mapping[str, RoleRequest], *, gpu: bool, placement: str, cpus_per_actor: float
) -> dict[str, list[Bundle]]:
    """:func:`role_bundles` before the custom resources."""
    cpus = float(cpus_per_actor)
    cpu_only = {
        role: [{"CPU": cpus} for _ in range(r.ranks)] for role, r in roles.items() if r.gpus_per_rank == 0
    }
    if not gpu:
        return {role: [{"CPU": cpus} for _ in range(r.ranks)] for role, r in roles.items()}
    gpu_roles = {role: r for role, r in roles.items() if r.gpus_per_rank > 0}
    if placement == "dedicated":
        return {
            role: [{"GPU": float(r.gpus_per_rank), "CPU": cpus} for _ in range(r.ranks)]
            for role, r in gpu_roles.items()
        } | cpu_only
    if placement != "colocated":
        raise ValueError(f"unknown placement {placement!r}")
    wide = [role for role, r in gpu_roles.items() if r.gpus_per_rank != 1]
    if wide:
        raise ValueError(f"colocated placement shares one GPU per rank; {wide} ask for more")
    # Every role's rank r lands on shared GPU r; fractions are rounded down so they never sum above 1.
    share = int(1e4 / len(gpu_roles)) / 1e4
    return {
        role: [{"GPU": share, "CPU": cpus} for _ in range(r.ranks)] for role, r in gpu_roles.items()
    } | cpu_only


def colocated_bundles(bundles: Mapping[str, list[Bundle]]) -> list[Bundle]:
    """Shared bundles for colocated placement: bundle r holds rank r of every role (1 GPU each on GPU)."""
    size = max(len(b) for b in bundles.values())
    shared: list[Bundle] = [{} for _ in range(size)]
    for role_list in bundles.values():
        for r, bundle in enumerate(role_list):
            for key, value in bundle.items():
                shared[r][key] = shared[r].get(key, 0.0) + value
    for bundle in shared:
        if "GPU" in bundle:
            bundle["GPU"] = 1.0
    return shared


def format_resources(resources: Mapping[str, float]) -> str:
    """``{CPU: 2, GPU: 1}``: a resource dict for one-line messages, without Ray's bookkeeping resources
    (memory, object store, ``node:<ip>`` markers, placement groups' own copies), which no role asks for."""
    shown = {k: v for k, v in resources.items() if not _bookkeeping(k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


_GROUP_RESOURCE = re.compile(r"_group_(\d+_)?[0-9a-f]{32,}$")
"""Ray's per-placement-group copies of a resource (``CPU_group_<pg id>``, ``CPU_group_<index>_<pg id>``)."""


def _bookkeeping(resource: str) -> bool:
    return (
        resource in ("memory", "object_store_memory")
        or resource.startswith("node:")
        or _GROUP_RESOURCE.search(resource) is not None
    )


def sum_bundles(bundles: Iterable[Bundle]) -> Bundle:
    """Resource-wise sum of bundles."""
    total: Bundle = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def check_feasible(
    bundles: Mapping[str, list[Bundle]], cluster: ClusterResources, colocated: bool = False
) -> None:
    """Raise a one-line UserError for a request this cluster can never satisfy; otherwise return.

    Checks, in order: each bundle fits some node (or node type); each role alone fits the cluster's
    limit; all roles together fit (dedicated), or the shared bundles do (colocated). "Limit" means
    the current totals, or the autoscaler's maximum when one exists. Requests that fit but are busy
    now are left to the placement wait (``cluster/placement.py``).
    """
    if cluster.unbounded:
        return
    grow = "an autoscaler may grow it to" if cluster.autoscaling else "no autoscaler can add more"
    for role, role_list in bundles.items():
        for bundle in role_list:
            if not any(
                all(node.get(k, 0.0) + EPS >= v for k, v in bundle.items()) for node in cluster.node_shapes
            ):
                raise UserError(
                    f"role '{role}' needs {format_resources(bundle)} per actor, but no node has that much "
                    f"(nodes: {', '.join(format_resources(n) for n in cluster.node_shapes) or 'none'})"
                )
        _check_total(f"role '{role}' ({len(role_list)} actors)", sum_bundles(role_list), cluster, grow)
    together = colocated_bundles(bundles) if colocated else [b for bl in bundles.values() for b in bl]
    mode = "colocated" if colocated else "dedicated"
    _check_total(
        f"roles {', '.join(bundles)} together ({mode} placement)", sum_bundles(together), cluster, grow
    )


def _check_total(who: str, asked: Bundle, cluster: ClusterResources, grow: str) -> None:
    for resource, amount in sorted(asked.items()):
        limit = cluster.limit(resource)
        if amount > limit + EPS:
            has = f"{cluster.total.get(resource, 0.0):g}"
            extra = f", {grow} {limit:g}" if cluster.autoscaling else f" and {grow}"
            raise UserError(f"{who} needs {amount:g} {resource} but the cluster has {has} {resource}{extra}")
