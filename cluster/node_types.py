"""What an autoscaler may add, read from its cluster YAML; and that YAML's node types on one machine.

Ray's autoscaler does not tell a driver what it can add: ``state.get_cluster_config()`` (the record
Ray Train's feasibility check reads) is empty under ``ray up``'s autoscaler and under the fake
multi-node provider alike, so without the YAML a request no node type could ever hold would wait
out ``cluster.placement_timeout_s``. The YAML is where the limits live: ``available_node_types`` (each
type's ``resources`` and ``max_workers``) and the cluster-wide ``max_workers``. ``ray up`` copies the
config, with each type's resources filled in from its instance type, to the head as
``~/ray_bootstrap_config.yaml``, which is where a driver running on the head (``ray job submit`` runs it
there) finds it without being told (docs/design.md, "An autoscaler's limits").

:func:`fake_cluster_config` turns the same file into a config for Ray's fake multi-node provider, whose
autoscaler launches and removes worker raylets on this machine: the test of the autoscaling path
exercises ray_cluster.yaml's own node types and ``max_workers``, with each GPU replaced by a custom
resource a CPU machine can offer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainers.errors import UserError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where ``ray up`` leaves the cluster config on the head (its ``--autoscaling-config``)."""
FAKE_HEAD_TYPE = "ray.head.default"
"""The node type name the fake multi-node provider gives its head."""
_NOT_RESOURCES = ("memory", "object_store_memory")


def find_autoscaler_config(setting: str) -> Path | None:
    """``cluster.autoscaler_config``: 'auto' is :data:`BOOTSTRAP_CONFIG` if it exists (else None), '' is
    None, anything else a file that must exist."""
    if setting == "":
        return None
    if setting == "auto":
        path = Path(BOOTSTRAP_CONFIG).expanduser()
        return path if path.is_file() else None
    path = Path(setting).expanduser()
    if not path.is_file():
        raise UserError(f"cluster.autoscaler_config: no such file: {path}")
    return path


def load_cluster_yaml(path: Path) -> dict[str, Any]:
    """A Ray cluster YAML as a dict; a file that is not one is a one-line user error."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cluster.autoscaler_config: cannot read {path}: {str(e).splitlines()[0]}") from None
    types = cfg.get("available_node_types") if isinstance(cfg, dict) else None
    if not isinstance(types, dict) or not types:
        raise UserError(
            f"cluster.autoscaler_config: {path} has no available_node_types (not a Ray cluster YAML)"
        )
    for name, spec in types.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("resources", {}), dict):
            raise UserError(f"cluster.autoscaler_config: {path}: node type '{name}' has no resources mapping")
    return cfg


def worker_types(cfg: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], int]]:
    """The node types an autoscaler may launch, each with the most nodes of it that can run at once: every
    type but the head's, its ``max_workers`` (Ray's default: the cluster-wide one) capped by the
    cluster-wide ``max_workers``, types that come to 0 left out."""
    head = cfg.get("head_node_type")
    cap = int(cfg.get("max_workers", 2**31))
    counts = {
        name: (spec, min(int(spec.get("max_workers", cap)), cap))
        for name, spec in cfg["available_node_types"].items()
        if name != head
    }
    return {name: (spec, count) for name, (spec, count) in counts.items() if count > 0}


def addable_limits(cfg: Mapping[str, Any]) -> tuple[list[dict[str, float]], dict[str, float]] | None:
    """``(node shapes, most of each resource the launchable nodes can add together)``, or None when a
    launchable type leaves its resources to the cloud provider (``resources: {}``): its shape is then
    unknown here and no limit can be told.

    The most of a resource takes the types richest in it first, each up to its own ``max_workers``, until
    the cluster-wide ``max_workers`` is used up: an upper bound no mix of launched nodes exceeds.
    """
    shapes: list[dict[str, float]] = []
    counts: list[int] = []
    for spec, count in worker_types(cfg).values():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items() if k not in _NOT_RESOURCES}
        if not res:
            return None
        shapes.append(res)
        counts.append(count)
    cap = int(cfg.get("max_workers", 2**31))
    most: dict[str, float] = {}
    for resource in {k for shape in shapes for k in shape}:
        left, total = cap, 0.0
        for amount, count in sorted(
            ((s.get(resource, 0.0), c) for s, c in zip(shapes, counts)), reverse=True
        ):
            take = min(count, left)
            total += amount * take
            left -= take
        most[resource] = total
    return shapes, most


def fake_node_types(
    cfg: Mapping[str, Any], *, cpus_per_node: int, gpu_resource: str = "gpu_standin"
) -> dict[str, dict[str, Any]]:
    """The cluster YAML's launchable node types for Ray's fake multi-node provider on a CPU machine.

    Each keeps its name, ``min_workers`` and ``max_workers`` (as :func:`worker_types` counts it) and its
    custom resources; its GPUs become ``gpu_resource`` (a role asks for that instead of GPU, e.g.
    ``cluster.role_resources='{"*": {gpu_standin: 1}}'``), and its CPUs become ``cpus_per_node`` (one
    machine cannot offer a p5's 192). Every launchable type must state its resources: the fake provider
    has no instance catalogue to fill them in from.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, (spec, count) in worker_types(cfg).items():
        res = dict(spec.get("resources") or {})
        if "GPU" not in res and "CPU" not in res:
            raise ValueError(f"node type '{name}' states no CPU or GPU resources")
        fake: dict[str, float] = {
            k: float(v) for k, v in res.items() if k not in ("CPU", "GPU", *_NOT_RESOURCES)
        }
        fake["CPU"] = float(cpus_per_node)
        if res.get("GPU"):
            fake[gpu_resource] = float(res["GPU"])
        out[name] = {
            "resources": fake,
            "node_config": {},
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": count,
        }
    return out


def fake_cluster_config(
    cfg: Mapping[str, Any],
    *,
    gcs_address: str,
    cpus_per_node: int,
    head_cpus: int = 0,
    idle_timeout_minutes: float | None = None,
    gpu_resource: str = "gpu_standin",
) -> dict[str, Any]:
    """A whole autoscaling config for Ray's ``fake_multinode`` provider from a cloud cluster YAML: its worker
    types (:func:`fake_node_types`), its ``max_workers`` and ``upscaling_speed``, a head of
    ``head_cpus`` CPUs, and the head's GCS at ``gcs_address`` (``host:port``; the provider otherwise
    assumes port 6379). ``idle_timeout_minutes`` overrides the file's (a test does not wait 10 minutes)."""
    return {
        "cluster_name": f"{cfg.get('cluster_name', 'cluster')}-local",
        "max_workers": int(cfg.get("max_workers", 2)),
        "upscaling_speed": float(cfg.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": float(
            cfg.get("idle_timeout_minutes", 5) if idle_timeout_minutes is None else idle_timeout_minutes
        ),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            FAKE_HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **fake_node_types(cfg, cpus_per_node=cpus_per_node, gpu_resource=gpu_resource),
        },
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
