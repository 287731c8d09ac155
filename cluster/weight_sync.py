"""Moving the policy's weights into every vLLM rollout engine after a training step.

One interface, one path per transport (runs inside the policy's rank-0 actor, which holds the
rollout engines' actor handles):

    sync = BroadcastSync(engines, node_ip, 0, backend="gloo")   # or CpuBlobSync(engines) / CudaIpcSync(engines)
    stats = sync.push(state_dict.items())   # every iteration; returns when all engines hold the weights

``trainers.config.transport.choose_transport`` is the one place that picks the transport
(``rollout.weight_sync``, device, placement; pure, so the config check uses it too) and :func:`make_sync`
builds it in the policy actor.

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

Transports (docs/design.md, "Weight transport (issue 17)"):
- :class:`BroadcastSync` — a broadcast from the policy's rank 0 to every engine worker over a process
  group of their own (``cluster.weight_broadcast``): NCCL on dedicated GPUs (the GPU default; run by
  tests/gpu only), gloo on CPU (the same code; tested on CPU: tests/integration/test_rollout.py and the
  engine-loss fault test).
- :class:`CpuBlobSync` — safetensors bytes through the Ray object store. Works everywhere, needs no
  group; the CPU default (measured faster there than gloo over loopback TCP); tested on CPU.
- :class:`CudaIpcSync` — CUDA IPC handles when the engine shares the trainer's GPU (colocated).
  Not run by this project's CPU tests.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from cluster.weight_broadcast import (
    BACKENDS,
    DEFAULT_TIMEOUT_S,
    WeightGroup,
    flatten_bucket,
    host_store,
    join_group,
)

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

    def reset(self) -> None:
        """An engine was restarted: forget what it lost (a group membership); nothing for most transports."""
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
                loaded = [a + b for a, b in zip(loaded, self._wait(inflight.pop(0)), strict=True)]
        for refs in inflight:
            loaded = [a + b for a, b in zip(loaded, self._wait(refs), strict=True)]
        ray.get([e.finish_weight_update.remote() for e in self.engines])
        if any(count != stats["tensors"] for count in loaded):
            raise RuntimeError(f"weight sync sent {stats['tensors']} tensors but engines loaded {loaded}")
        return {**stats, "seconds": time.perf_counter() - start}

    def _wait(self, refs: list[ray.ObjectRef]) -> list[int]:
        """Block until every engine loaded one bucket; the tensor count of each."""
        return ray.get(refs)

    def close(self) -> None:
        """Release transport resources (process groups)."""
        return None


class CpuBlobSync(WeightSync):
    """safetensors bytes through the Ray object store: one ``ray.put`` per bucket, every engine reads it."""

    max_inflight_buckets = 2  # serialise the next bucket while engines load this one

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> list[ray.ObjectRef]:
        ref = ray.put(serialize_bucket(bucket))
        return [e.update_weights.remote(ref) for e in self.engines]


ENGINE_LOSS_GRACE_S = 10.0
"""How long a failed collective waits for the other engines' calls to resolve (a lost engine's call fails
with ``RayActorError`` within a second or two, which the driver's recovery needs to see)."""


def raise_engine_loss(refs: list[ray.ObjectRef], timeout_s: float) -> None:
    """Raise the ``RayActorError`` of the first of ``refs`` (engine calls) that failed with one within
    ``timeout_s``; return if none did."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError:
            raise
        except Exception:  # noqa: S112 (another engine's own failure: keep looking for a lost one)
            continue


class BroadcastSync(WeightSync):
    """Broadcast from the policy's rank 0 to every worker of every engine, over a group of their own.

    ``backend`` 'gloo' (CPU tensors) or 'nccl' (rank 0's current GPU; every engine on other GPUs: NCCL
    refuses two ranks on one device, colocated engines use :class:`CudaIpcSync`) -- the same code, the
    backend the only difference. World: rank 0 = this process, engine i's tensor-parallel workers at
    ranks ``1 + i * tp + r``. The group is formed at the first push (or :meth:`setup`) on ``master_addr``
    (this process's node IP: engines may be on other nodes) and ``master_port`` (0: a free port the OS
    picks); a rebuild always takes a fresh port.

    Each bucket becomes one flat buffer per dtype (``cluster.weight_broadcast``); the layout goes with
    the Ray call that makes the engines receive, and up to ``max_inflight_buckets`` buckets are on the
    wire before waiting for the oldest. A push that fails tears the group down (a gloo group with a
    failed collective is not reusable, and a restarted engine is no member), so the next push forms a
    new one with every engine; :meth:`reset` does the same when the caller knows an engine restarted.
    """

    max_inflight_buckets = 2

    def __init__(
        self,
        engines: list[Any],
        master_addr: str,
        master_port: int = 0,
        backend: str = "gloo",
        tensor_parallel_size: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        super().__init__(engines, bucket_bytes)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.master_addr, self.master_port, self.tp = master_addr, master_port, tensor_parallel_size
        self.backend, self.timeout_s = backend, timeout_s
        self.device = "cuda" if backend == "nccl" else "cpu"
        self.group: WeightGroup | None = None
        self.setups = 0  # groups formed by this object (a rebuild after an engine restart counts)
        self._works: list[tuple[list, list[torch.Tensor]]] = []  # per bucket in flight: works, buffers

    def setup(self) -> None:
        """Form the group: engines join in the background while this process joins as rank 0."""
        self.close()
        world = 1 + len(self.engines) * self.tp
        port = self.master_port if self.setups == 0 else 0
        store = host_store(self.master_addr, port, world, self.timeout_s)
        refs = [
            e.init_weight_broadcast.remote(
                self.master_addr, store.port, 1 + i * self.tp, world, self.backend, self.timeout_s
            )
            for i, e in enumerate(self.engines)
        ]
        self.group = join_group(
            self.backend, self.master_addr, store.port, 0, world, self.timeout_s, store=store
        )
        ray.get(refs)
        self.setups += 1

    def reset(self) -> None:
        """Drop the group: the next push forms a new one (an engine restarted and lost its membership)."""
        self.close()

    def push(self, named: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """:meth:`WeightSync.push`, forming the group first if there is none; the stats say
        ``group_setup`` (1 if this push formed it) and ``group_setups`` (so far)."""
        formed = self.group is None
        if formed:
            try:
                self.setup()
            except BaseException:
                self.close()
                for _ in named:  # the other policy ranks' gathers
                    pass
                raise
        return {**super().push(named), "group_setup": int(formed), "group_setups": self.setups}

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> list[ray.ObjectRef]:
        layout, buffers = flatten_bucket(bucket, self.device)
        refs = [e.receive_weight_broadcast.remote(layout.as_dict()) for e in self.engines]
        self._works.append(([self.group.broadcast(b) for b in buffers], buffers))
        return refs

    def _wait(self, refs: list[ray.ObjectRef]) -> list[int]:
        """Engines' counts as they finish (an engine lost shows at once as its ``RayActorError``,
        even while another still waits on its collective), then rank 0's side of the bucket."""
        counts = dict.fromkeys(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                counts[ready[0]] = ray.get(ready[0])
            except RayActorError:
                raise
            except Exception:  # a peer's collective failed: if an engine died, that is the error to report
                raise_engine_loss(pending, ENGINE_LOSS_GRACE_S)
                raise
        works, _ = self._works.pop(0)
        for work in works:
            work.wait()
        return [counts[r] for r in refs]

    def _abandon(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.close()
        super()._abandon(named)

    def close(self) -> None:
        """Drop the group (gloo's destructor waits for any collective still pending, up to its timeout)."""
        self._works.clear()
        self.group = None


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


def make_sync(
    transport: str,
    engines: list[Any],
    *,
    device: str,
    master_addr: str,
    tensor_parallel_size: int = 1,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> WeightSync:
    """The :class:`WeightSync` of a transport ``trainers.config.transport.choose_transport`` returned
    (not 'auto')."""
    if transport == "blob":
        return CpuBlobSync(engines, bucket_bytes)
    if transport == "broadcast":
        backend = "nccl" if device == "cuda" else "gloo"
        return BroadcastSync(
            engines,
            master_addr,
            0,
            backend,
            tensor_parallel_size=tensor_parallel_size,
            bucket_bytes=bucket_bytes,
        )
    if transport == "ipc":
        return CudaIpcSync(engines, bucket_bytes)
    raise ValueError(f"no weight transport {transport!r} (choose_transport resolves 'auto')")
