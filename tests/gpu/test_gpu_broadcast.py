"""The NCCL broadcast weight sync (dedicated placement): a trainer actor on one GPU pushes a changed model into
a vLLM engine on another; the engine's log-probs then match the trainer's transformers model.

NCCL refuses two ranks on one device, so this needs two GPUs (skipped on a one-GPU machine, which the
colocated CUDA-IPC test covers instead: tests/gpu/test_gpu_colocated.py). The transport is
``cluster.weight_sync.BroadcastSync`` with ``backend="nccl"`` (the same class runs gloo on CPU).
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.gpu.gpu_models import mean_abs_diff, random_sequences, record, start_engine

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="NCCL broadcast needs the trainer and the engine on two GPUs",
    ),
]
TOKENS = 1000


class SyncTrainer:
    """The sending side: a transformers copy of the policy (changed so it differs from the engine's) on its
    own GPU, with the transport the policy's rank 0 would use."""

    def __init__(self, model_dir: str):
        from tests.gpu.gpu_models import load_model, sharpen

        self.model = load_model(model_dir)
        sharpen(self.model, 4.0)

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        from tests.gpu.gpu_models import hf_logprobs

        return hf_logprobs(self.model, sequences)

    def push(self, engines: list, port: int) -> dict:
        from cluster.weight_sync import BroadcastSync

        sync = BroadcastSync(engines, "127.0.0.1", port, backend="nccl")
        sync.setup()
        try:
            return sync.push(self.model.named_parameters(remove_duplicate=False))
        finally:
            sync.close()


def test_nccl_broadcast_sync_matches_the_trainers_logprobs(gpu_ray, policy_dir):
    from tests.conftest import free_port

    gpu_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    engine = start_engine(gpu_ray, policy_dir, 2 * 2**30)
    trainer = gpu_ray.remote(SyncTrainer).options(num_gpus=1, num_cpus=1).remote(str(policy_dir))
    try:
        seqs = random_sequences(4, 64, TOKENS, seed=2)
        expected = gpu_ray.get(trainer.logprobs.remote(seqs), timeout=600)
        stale = mean_abs_diff(gpu_ray.get(engine.prompt_logprobs.remote(seqs), timeout=600), expected)
        stats = gpu_ray.get(trainer.push.remote([engine], free_port()), timeout=300)
        synced = mean_abs_diff(gpu_ray.get(engine.prompt_logprobs.remote(seqs)), expected)
        found = {"stale_mean_abs": stale, "synced_mean_abs": synced, **stats}
        record("nccl_broadcast_sync", found)
        assert stale > 1.0, found
        assert synced < 0.05 * stale, found
    finally:
        gpu_ray.kill(engine)
        gpu_ray.kill(trainer)
