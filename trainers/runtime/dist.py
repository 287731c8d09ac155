"""torch.distributed helpers that work with and without a process group (a single process is world 1).

Inside Ray Train the group already exists; :func:`init_distributed` makes DeepSpeed's communication layer
adopt it (without that DeepSpeed sees world size 1 and rejects the batch sizes). PPO actors form their
group themselves (``cluster.actor_group.DistributedWorker``) before calling it.
"""

from __future__ import annotations

import torch


def backend_for(device: str) -> str:
    """torch.distributed backend for a device: nccl on GPU, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def init_distributed(device: str) -> None:
    """Make DeepSpeed use the process group that Ray Train (or torchrun) already created.

    Safe to call more than once. Without an existing group, DeepSpeed creates one from the usual
    environment variables (MASTER_ADDR, RANK, WORLD_SIZE...).
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend_for(device))


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """torch.distributed barrier when a group exists, no-op otherwise."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64, one collective); the input itself without a group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (one all-reduce; collective); ``flag`` itself without a group."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0
