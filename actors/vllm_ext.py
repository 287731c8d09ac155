"""Methods added to every vLLM worker process: receiving new policy weights.

vLLM imports this class by dotted path (``LLM(worker_extension_cls="actors.vllm_ext.WeightReceiver")``)
and mixes it into its worker, so ``self`` below is a vLLM worker: ``self.model_runner`` holds the model,
``self.device`` its device, ``self.rank`` its tensor-parallel rank. The rollout actor reaches these
methods with ``LLM.collective_rpc(name, args=...)``, which runs them on every worker of the engine.

One update is always ``rlhf_start_weight_update`` -> one or more loads -> ``rlhf_finish_weight_update``
(the ``rlhf_`` prefix keeps clear of vLLM's own worker methods: a name clash is an error at start-up). The
bracket is vLLM's layerwise reload (the same lifecycle its own weight-transfer engines use): start puts
the layers back into checkpoint form, each load feeds Hugging Face-named tensors through the model's
``load_weights`` (which fuses q/k/v and gate/up itself), and a layer is re-processed once all its
tensors arrived, so a bucket may end in the middle of a layer. Calling ``load_weights`` outside the
bracket fails (``'Parameter' object has no attribute 'weight_loader'``).

Three transports feed the loads:
- ``rlhf_load_weight_blob``: a safetensors byte string (tested on CPU);
- ``rlhf_init_weight_broadcast`` + ``rlhf_receive_weight_broadcast``: a broadcast group with the trainer's
  rank 0, NCCL on dedicated GPUs (the GPU default) or gloo on CPU (the same code; tested on CPU);
- ``rlhf_load_weight_ipc``: CUDA IPC handles of tensors living on the same GPU (GPU, colocated placement;
  NOT run in this project's CPU tests).
"""

from __future__ import annotations

from typing import Any


class WeightReceiver:
    """vLLM worker extension: the receiving end of every weight-sync transport."""

    # --- the update bracket -------------------------------------------------------------------

    def rlhf_start_weight_update(self) -> None:
        """Open an update: layers wait for all their checkpoint tensors before re-processing."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def rlhf_finish_weight_update(self) -> None:
        """Close an update: process layers still pending, restore any layer that got no tensor."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)

    def _load(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Feed (Hugging Face name, tensor) pairs to the model; returns how many were given."""
        self.model_runner.get_model().load_weights(iter(named_tensors))
        return len(named_tensors)

    # --- CPU transport: safetensors bytes ------------------------------------------------------

    def rlhf_load_weight_blob(self, blob: bytes) -> int:
        """Load one bucket serialised with ``safetensors.torch.save``; returns its tensor count.

        Bytes, not tensors, cross ``collective_rpc``: tensors nested in lists arrive as lists.
        """
        from safetensors.torch import load

        return self._load(list(load(blob).items()))

    # --- broadcast from the trainer's rank 0: gloo on CPU, NCCL on GPU ---------------------------

    def rlhf_init_weight_broadcast(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
    ) -> None:
        """Join the trainer's weight group as rank ``rank_offset + tensor-parallel rank`` (trainer = 0),
        replacing any earlier group of this worker (a rebuild after an engine restart).

        The group has its own ``TCPStore`` (``cluster.weight_broadcast``), apart from vLLM's own
        torch.distributed world in this process.
        """
        from cluster.weight_broadcast import join_group

        self._weight_group = None  # the old group's sockets go before the new rendezvous
        rank = rank_offset + self.rank
        self._weight_group = join_group(backend, master_addr, master_port, rank, world_size, timeout_s)
        self._weight_device = self.device if backend == "nccl" else "cpu"

    def rlhf_receive_weight_broadcast(self, layout: dict) -> int:
        """Receive one bucket (one flat buffer per dtype, ``layout`` from
        ``cluster.weight_broadcast.BucketLayout.as_dict``) and load its tensors; returns their count."""
        from cluster.weight_broadcast import BucketLayout, empty_buffers, unflatten_bucket

        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("no weight broadcast group: rlhf_init_weight_broadcast was not called")
        bucket = BucketLayout.from_dict(layout)
        buffers = empty_buffers(bucket, self._weight_device)
        for work in [group.broadcast(b) for b in buffers]:
            work.wait()
        # Views of fresh buffers: a layer split over buckets keeps its tensors past this call.
        return self._load(unflatten_bucket(bucket, buffers))

    # --- GPU transport, colocated placement: CUDA IPC -------------------------------------------

    def rlhf_load_weight_ipc(self, names: list[str], handles: list[dict[str, tuple]]) -> int:
        """Rebuild tensors shared by the trainer on this same GPU and load them. Untested on CPU.

        ``handles[i]`` maps a GPU UUID to the ``reduce_tensor`` arguments of tensor ``names[i]``;
        the device index inside them is the trainer's, so it is replaced by this worker's (the two
        processes may number the same GPU differently under ``CUDA_VISIBLE_DEVICES``).
        """
        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        index = self.device.index
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        received = []
        for name, by_gpu in zip(names, handles, strict=True):
            if uuid not in by_gpu:
                raise RuntimeError(f"weight '{name}' was not shared on this worker's GPU {uuid}")
            args = list(by_gpu[uuid])
            args[6] = index  # position of the device index in reduce_tensor's rebuild arguments
            # Own copy: a layer split over buckets keeps its tensors buffered past this call, when
            # the trainer may already have freed the shared memory.
            received.append((name, rebuild_cuda_tensor(*args).clone()))
        torch.cuda.synchronize()  # the copies are done before the trainer frees its tensors
        return self._load(received)
