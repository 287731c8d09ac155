"""The broadcast weight transport's shared pieces: its own process group, and buckets as flat buffers.

Both ends import this module: the policy's rank 0 (``cluster.weight_sync.BroadcastSync``) and every vLLM
worker (``actors.vllm_ext.WeightReceiver``). Nothing here touches a default torch.distributed group --
DeepSpeed's on the policy, vLLM's own inside the engine: the group is built from its own
``TCPStore`` and a ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` constructed directly, and every
collective is called on that object.

A bucket crosses as one contiguous buffer per dtype (one broadcast each, in first-appearance order of
the dtypes); the names, shapes, dtypes and element offsets travel beside it in a :class:`BucketLayout`
(plain lists: it goes through a Ray call and vLLM's ``collective_rpc``). The buffers are broadcast as
bytes (``uint8`` views), which every backend carries whatever the dtype.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import socket
from collections.abc import Sequence

import torch

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 120.0
"""Longest wait of one collective (and of the group's rendezvous): a hung peer fails the push instead of
blocking it for good. A receiver only waits for bytes rank 0 already has in hand, so this bounds a
transfer of one bucket plus the load of the bucket before it."""


@dataclasses.dataclass
class BucketLayout:
    """Where each tensor of a bucket lies in the bucket's flat buffers (one buffer per dtype)."""

    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    """Per tensor, e.g. 'float32', 'bfloat16'."""
    offsets: list[int]
    """Per tensor, its first element in its dtype's buffer."""
    buffers: list[tuple[str, int]]
    """(dtype, element count) of each flat buffer, in broadcast order."""

    def as_dict(self) -> dict:
        """Plain lists and strings: what a Ray call or ``collective_rpc`` carries."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BucketLayout:
        return cls(**{**d, "buffers": [tuple(b) for b in d["buffers"]]})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flatten_bucket(
    bucket: Sequence[tuple[str, torch.Tensor]], device: str | torch.device = "cpu"
) -> tuple[BucketLayout, list[torch.Tensor]]:
    """One flat 1-D buffer per dtype on ``device`` holding the bucket's tensors in order, and the layout.

    Copies (detached), so tied tensors (one storage, two names) simply appear twice.
    """
    order: list[str] = []
    counts: dict[str, int] = {}
    offsets = []
    for _, t in bucket:
        name = dtype_name(t.dtype)
        if name not in counts:
            order.append(name)
            counts[name] = 0
        offsets.append(counts[name])
        counts[name] += t.numel()
    flats = {name: torch.empty(counts[name], dtype=getattr(torch, name), device=device) for name in order}
    with torch.no_grad():
        for (_, t), offset in zip(bucket, offsets, strict=True):
            flat = flats[dtype_name(t.dtype)]
            flat[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
    layout = BucketLayout(
        names=[n for n, _ in bucket],
        shapes=[list(t.shape) for _, t in bucket],
        dtypes=[dtype_name(t.dtype) for _, t in bucket],
        offsets=offsets,
        buffers=[(name, counts[name]) for name in order],
    )
    return layout, [flats[name] for name in order]


def empty_buffers(layout: BucketLayout, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Receive buffers for ``layout``, in broadcast order."""
    return [torch.empty(n, dtype=getattr(torch, d), device=device) for d, n in layout.buffers]


def unflatten_bucket(layout: BucketLayout, buffers: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs viewing ``buffers`` (no copy): the inverse of :func:`flatten_bucket`."""
    by_dtype = {d: buf for (d, _), buf in zip(layout.buffers, buffers, strict=True)}
    out = []
    for name, shape, dtype, offset in zip(
        layout.names, layout.shapes, layout.dtypes, layout.offsets, strict=True
    ):
        out.append((name, by_dtype[dtype][offset : offset + math.prod(shape)].view(shape)))
    return out


def wire(buffer: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous buffer (what is broadcast)."""
    return buffer.view(torch.uint8)


def local_ip_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (the interface the group's sockets should bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: no packet is sent, the kernel only picks the route
        return s.getsockname()[0]


@dataclasses.dataclass
class WeightGroup:
    """A process group of its own: the ``TCPStore`` (rank 0 hosts it) and the backend object."""

    store: torch.distributed.Store
    group: torch.distributed.ProcessGroup
    rank: int
    world_size: int
    port: int

    def broadcast(self, buffer: torch.Tensor) -> torch.distributed.Work:
        """Start broadcasting ``buffer``'s bytes from rank 0 (in place on the other ranks)."""
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        return self.group.broadcast([wire(buffer)], opts)


def host_store(host: str, port: int, world_size: int, timeout_s: float) -> torch.distributed.TCPStore:
    """Rank 0's store; ``port`` 0 lets the OS pick a free one (read it back as ``store.port``)."""
    return torch.distributed.TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=rendezvous_timeout_s(timeout_s)),
        wait_for_workers=False,
    )


def join_group(
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    store: torch.distributed.TCPStore | None = None,
) -> WeightGroup:
    """Form the group as ``rank`` (rank 0 passes the store it hosts; the others connect to it).

    Gloo connects every pair here and returns once all ranks joined; NCCL creates its communicator at
    the first broadcast. The rendezvous may take :func:`rendezvous_timeout_s` (an engine may still be
    busy in a collective of the group this one replaces, up to ``timeout_s``); each collective after
    it waits at most ``timeout_s``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"weight broadcast backend must be one of {BACKENDS}, got {backend!r}")
    joining = datetime.timedelta(seconds=rendezvous_timeout_s(timeout_s))
    collective = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = torch.distributed.TCPStore(
            master_addr, master_port, world_size, is_master=False, timeout=joining
        )
    if backend == "gloo":
        opts = torch.distributed.ProcessGroupGloo._Options()
        opts._timeout = joining  # gloo's connect waits this long for every peer ...
        host = master_addr if rank == 0 else local_ip_towards(master_addr)
        opts._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname=host)]
        group = torch.distributed.ProcessGroupGloo(store, rank, world_size, opts)
        group._set_default_timeout(collective)  # ... each collective after it this long
    else:
        opts = torch.distributed.ProcessGroupNCCL.Options()
        opts._timeout = collective  # NCCL rendezvouses at the first collective, through the store
        group = torch.distributed.ProcessGroupNCCL(store, rank, world_size, opts)
    return WeightGroup(store=store, group=group, rank=rank, world_size=world_size, port=master_port)


def rendezvous_timeout_s(timeout_s: float) -> float:
    """How long forming a group may take: each engine first finishes what it is doing (at most a
    collective of an old group, ``timeout_s``), and a restarted one may still be starting."""
    return max(300.0, 3 * timeout_s)
