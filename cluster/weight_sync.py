"""Moving the policy's weights into every vLLM rollout engine after a training step.

One interface, one path per transport (runs inside the policy's rank-0 actor, which holds the
rollout engines' actor handles):

    sync = CpuBlobSync(engines)             # or NcclBroadcastSync(engines, ...) / CudaIpcSync(engines)
    sync.setup()                            # once (the NCCL group handshake; nothing for the others)
    stats = sync.push(state_dict.items())   # every iteration; returns when all engines hold the weights

``push`` takes ``(name, tensor)`` pairs with Hugging Face names, already gathered to full tensors (the
ZeRO-3 gather is the policy actor's job). An iterator lets the policy gather layer by layer; the gather
is a collective, so the other policy ranks iterate the same gather and discard it (except with
:class:`CudaIpcSync`, where every rank calls ``push``). Pairs are
grouped into buckets of about ``bucket_bytes`` and sent in order, so no transport ever builds a copy
of the whole model. Every engine sees ``start_weight_update``, one load per bucket, then
``finish_weight_update`` (``actors/vllm_ext.py`` explains why the bracket is needed).

Names: vLLM's Llama/Qwen2 ``load_weights`` takes Hugging Face checkpoint names as they are (it fuses
q/k/v and gate/up itself); :func:`vllm_name` only strips wrapper prefixes such as DeepSpeed's
``module.`` and :func:`vllm_named_weights` drops buffers vLLM does not load (rotary ``inv_freq``).

Transports:
- :class:`CpuBlobSync` — safetensors bytes through the Ray object store. Works everywhere; the CPU path.
- :class:`NcclBroadcastSync` — NCCL broadcast from the trainer GPU to all engine workers (dedicated
  GPUs). Not run by this project's tests (no GPU); written against vLLM's ``StatelessProcessGroup``
  and ``PyNcclCommunicator``.
- :class:`CudaIpcSync` — CUDA IPC handles when the engine shares the trainer's GPU (colocated).
  Not run by this project's tests (no GPU).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import ray
import torch

DEFAULT_BUCKET_BYTES = 256 * 2**20
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def vllm_name(name: str) -> str:
    """The name vLLM's ``load_weights`` expects for a Hugging Face parameter name (wrappers stripped)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def vllm_named_weights(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename for vLLM and drop non-persistent buffers that vLLM recomputes itself."""
    for name, tensor in named:
        if not name.endswith(SKIPPED_SUFFIXES):
            yield vllm_name(name), tensor


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return tensor.numel() * tensor.element_size()


def iter_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group pairs, in order, into buckets of at most ``bucket_bytes``; a larger tensor forms its own bucket."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def serialize_bucket(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors bytes of a bucket: CPU, contiguous, detached; tied tensors (one storage) copied apart.

    safetensors refuses two names sharing memory (e.g. tied embeddings in one bucket).
    """
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for name, tensor in bucket:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return save(tensors)


class WeightSync(ABC):
    """Pushes full policy weights into rollout engines (``RolloutEngine`` actor handles)."""

    max_inflight_buckets = 1  # buckets sent before waiting for the oldest: bounds memory held in flight

    def __init__(self, engines: list[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.engines = list(engines)
        self.bucket_bytes = bucket_bytes

    def setup(self) -> None:
        """One-time handshake with the engines (nothing to do unless the transport needs a group)."""
        return None

    @abstractmethod
    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> list[ray.ObjectRef]:
        """Start sending one bucket to every engine; refs resolve to the tensor count each engine loaded."""

    def push(self, named: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Send all pairs to every engine, bucket by bucket; returns {buckets, tensors, bytes, seconds}.

        ``named`` must hold every name of a tied weight (``named_parameters(remove_duplicate=False)``):
        vLLM's reload unties ``lm_head`` from ``embed_tokens``, so sending only the embedding leaves the
        old head in place (log-prob mismatch 1.6 instead of 1e-6 on the tiny preset).
        Raises RuntimeError if an engine loaded a different number of tensors than were sent.

        If the push fails (e.g. an engine died: ``RayActorError``), the rest of ``named`` is still consumed
        before the error is re-raised -- under ZeRO-3 each item is a gather the other policy ranks take
        part in, and stopping half-way would leave them blocked and out of step for the next sync -- and
        the surviving engines' updates are closed, so the caller can push again once the engine is back.
        """
        named = iter(named)
        try:
            return self._push(named)
        except BaseException:
            self._abandon(named)
            raise

    def _abandon(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        """After a failed push: take part in the remaining gathers, then close every engine's update
        that can still be closed (errors of lost engines are ignored: the caller handles those)."""
        for _ in named:
            pass
        for engine in self.engines:
            with contextlib.suppress(Exception):  # best effort: the original error is what the caller sees
                ray.get(engine.finish_weight_update.remote())

    def _push(self, named: Iterator[tuple[str, torch.Tensor]]) -> dict:
        """:meth:`push` without the failure handling."""
        start = time.perf_counter()
        ray.get([e.start_weight_update.remote() for e in self.engines])
        inflight: list[list[ray.ObjectRef]] = []
        loaded = [0] * len(self.engines)
        stats = {"buckets": 0, "tensors": 0, "bytes": 0}
        for bucket in iter_buckets(vllm_named_weights(named), self.bucket_bytes):
            inflight.append(self._send(bucket))
            stats["buckets"] += 1
            stats["tensors"] += len(bucket)
            stats["bytes"] += sum(tensor_bytes(t) for _, t in bucket)
            if len(inflight) >= self.max_inflight_buckets:
                loaded = [a + b for a, b in zip(loaded, ray.get(inflight.pop(0)), strict=True)]
        for refs in inflight:
            loaded = [a + b for a, b in zip(loaded, ray.get(refs), strict=True)]
        ray.get([e.finish_weight_update.remote() for e in self.engines])
        if any(count != stats["tensors"] for count in loaded):
            raise RuntimeError(f"weight sync sent {stats['tensors']} tensors but engines loaded {loaded}")
        return {**stats, "seconds": time.perf_counter() - start}

    def close(self) -> None:
        """Release transport resources (process groups)."""
        return None


class CpuBlobSync(WeightSync):
    """safetensors bytes through the Ray object store: one ``ray.put`` per bucket, every engine reads it."""

    max_inflight_buckets = 2  # serialise the next bucket while engines load this one

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> list[ray.ObjectRef]:
        ref = ray.put(serialize_bucket(bucket))
        return [e.update_weights.remote(ref) for e in self.engines]


class NcclBroadcastSync(WeightSync):
    """NCCL broadcast from the trainer's GPU (rank 0) to every worker of every engine (dedicated GPUs).

    NOT RUN in this project's tests (they run on CPU). World: rank 0 = this process, then engine i's
    tensor-parallel workers at ranks ``1 + i * tp .. i * tp + tp``. Every engine must be on a GPU other
    than the trainer's (NCCL refuses two ranks on one device); colocated engines use :class:`CudaIpcSync`.
    """

    def __init__(
        self,
        engines: list[Any],
        master_addr: str,
        master_port: int,
        tensor_parallel_size: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        super().__init__(engines, bucket_bytes)
        self.master_addr, self.master_port, self.tp = master_addr, master_port, tensor_parallel_size
        self.comm = None

    def setup(self) -> None:
        """Create the group: engines join in the background while this process joins as rank 0."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        world = 1 + len(self.engines) * self.tp
        refs = [
            e.init_weight_broadcast.remote(self.master_addr, self.master_port, 1 + i * self.tp, world)
            for i, e in enumerate(self.engines)
        ]
        group = StatelessProcessGroup.create(
            host=self.master_addr, port=self.master_port, rank=0, world_size=world
        )
        self.comm = PyNcclCommunicator(group, device=torch.cuda.current_device())
        ray.get(refs)

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> list[ray.ObjectRef]:
        names = [n for n, _ in bucket]
        dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        refs = [e.receive_weight_broadcast.remote(names, dtypes, shapes) for e in self.engines]
        stream = torch.cuda.current_stream()
        for _, tensor in bucket:
            self.comm.broadcast(tensor.detach().to("cuda").contiguous(), src=0, stream=stream)
        stream.synchronize()
        return refs

    def close(self) -> None:
        self.comm = None


class CudaIpcSync(WeightSync):
    """CUDA IPC handles for engines sharing GPUs with the policy ranks (colocated placement).

    NOT RUN in this project's tests (they run on CPU). Every policy rank calls :meth:`push` with the
    same gathered tensors (ZeRO-3's gather leaves the full tensor on every rank's GPU); rank 0 gets
    the engine handles, the others pass ``engines=[]``. Each bucket's handles are all-gathered and
    merged by GPU UUID, so an engine rebuilds the copy on its own GPU; the tensors stay alive until
    every engine has copied them (a barrier after each bucket). vLLM's engine process must accept
    pickled arguments (``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, set by ``actors.rollout``).
    """

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> list[ray.ObjectRef]:
        import torch.distributed as dist
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        alive = [t.detach().to("cuda").contiguous() for _, t in bucket]
        torch.cuda.current_stream().synchronize()  # the copies exist before another process reads them
        handles = [{uuid: reduce_tensor(t)[1]} for t in alive]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, handles)
            handles = [
                {k: v for rank_handles in every for k, v in rank_handles[i].items()}
                for i in range(len(alive))
            ]
        names = [n for n, _ in bucket]
        refs = [e.update_weights_ipc.remote(names, handles) for e in self.engines]
        ray.get(refs)  # rank 0: engines copied the bucket ...
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # ... before any rank frees its tensors
        del alive
        return refs
