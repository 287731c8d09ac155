"""torch.distributed helpers that work with and without a process group (a single process is world 1).

Inside Ray Train the group already exists; :func:`init_distributed` makes DeepSpeed's communication layer
adopt it (without that DeepSpeed sees world size 1 and rejects the batch sizes). PPO actors form their
group themselves (``cluster.actor_group.DistributedWorker``) before calling it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

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

    os.environ["PATH"] = path_for_jit(os.environ.get("PATH", ""), Path(sys.executable).parent)
    deepspeed.init_distributed(dist_backend=backend_for(device))


def path_for_jit(path: str, interpreter_dir: Path) -> str:
    """``PATH`` with the interpreter's own directory first when that directory holds a ``ninja``.

    DeepSpeed compiles its CPU shared-memory collective (``deepspeed_shm_comm``) on first use, through
    torch's JIT builder, which runs whichever ``ninja`` comes first on ``PATH`` in one build folder per
    user. Environments carry two: the system's (1.11 here) and the ``ninja`` wheel in the virtual
    environment (1.13). From 1.13 ninja hashes commands differently in its build log, so each
    switch between the two reads as a changed command and rebuilds the op from scratch (~1 min on 2
    cores, while every rank waits on the build lock). Which one a worker finds depended on how its
    process was started (an activated environment, ``ray start`` from the venv's ``bin``, or not).
    Pinning the one next to the interpreter makes every worker of one environment agree; without a
    ``ninja`` there, ``PATH`` is left as it is."""
    ninja = interpreter_dir / "ninja"
    if not ninja.is_file() or shutil.which("ninja", path=path) == str(ninja):
        return path
    first = str(interpreter_dir)
    rest = [entry for entry in path.split(os.pathsep) if entry and entry != first]
    return os.pathsep.join([first, *rest])


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
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of a few floats over all ranks (float64, one collective); the input itself without a
    group."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: list[float], op: str) -> list[float]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (one all-reduce; collective); ``flag`` itself without a group."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0
