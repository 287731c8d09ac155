"""Which weight transport carries the policy's weights into the rollout engines: the one place that
decides it (``rollout.weight_sync``, the device, the placement). Pure: the config check
(:meth:`trainers.config.run.Config.validate`) and the PPO setup (``trainers.ppo.setup``) both call it; the
transports themselves are ``cluster.weight_sync`` (docs/design.md, "Weight transport (issue 17)").
"""

from __future__ import annotations

TRANSPORTS = ("auto", "blob", "broadcast", "ipc")
CPU_DEFAULT = "blob"
"""What ``auto`` picks on CPU: the blob transport, measured 1.8x as fast as the gloo broadcast for a 14 MB
model into 2 engines on one machine (shared-memory object store against loopback TCP; the broadcast led
only for a 2 MB model; tests/bench/results/weight_sync_cpu.json, docs/design.md)."""


def choose_transport(device: str, placement: str, requested: str = "auto") -> str:
    """The weight transport for engines on ``device`` ('cpu'/'cuda') placed ``placement``
    ('dedicated'/'colocated'): ``requested`` if it works there, else ValueError; ``auto``:

    ==========  ===========  =========================================
    device      placement    transport
    ==========  ===========  =========================================
    cuda        colocated    ipc (engine and trainer share the GPU)
    cuda        dedicated    broadcast (NCCL)
    cpu         any          :data:`CPU_DEFAULT` (blob)
    ==========  ===========  =========================================
    """
    if requested not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync must be one of {TRANSPORTS}, got {requested!r}")
    gpu, colocated = device == "cuda", placement == "colocated"
    if requested == "auto":
        return ("ipc" if colocated else "broadcast") if gpu else CPU_DEFAULT
    if requested == "ipc" and not (gpu and colocated):
        raise ValueError(
            f"rollout.weight_sync=ipc needs engines sharing the trainer's GPU (cluster.device=cuda, "
            f"cluster.placement=colocated), got device {device!r}, placement {placement!r}"
        )
    if requested == "broadcast" and gpu and colocated:
        raise ValueError(
            "rollout.weight_sync=broadcast on colocated GPUs: NCCL refuses two ranks on one GPU "
            "(use ipc or auto)"
        )
    return requested
