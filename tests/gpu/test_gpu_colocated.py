"""One vLLM engine sharing the GPU with this process, as in colocated placement: sleep frees its memory,
wake restores it (weights first, then the KV cache), and the CUDA-IPC weight sync between the two wakes
leaves the engine computing the new model's log-probs.

One engine (Qwen2.5-0.5B-shaped, bf16, eager, a 4 GiB KV cache, sleep mode on) serves both tests, in this
order: the memory test needs the start-up weights, the sync test replaces them. What each test measured goes
to ``$RLHF_GPU_RESULTS`` (:func:`tests.gpu.gpu_models.record`).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.gpu_models import (
    hf_logprobs,
    load_model,
    mean_abs_diff,
    random_sequences,
    record,
    sharpen,
    start_engine,
)

pytestmark = pytest.mark.timeout(600)

GIB = 2**30
KV_CACHE_BYTES = 4 * GIB
TOKENS = 1000
"""Ids the test sequences draw from (the test tokenizer's learned entries)."""


@pytest.fixture(scope="module")
def engine(gpu_ray, policy_dir):
    """A RolloutEngine actor on this process's GPU, started with sleep mode (as colocated runs start it)."""
    handle = start_engine(gpu_ray, policy_dir, KV_CACHE_BYTES, enable_sleep_mode=True)
    gpu_ray.get(handle.health.remote(), timeout=600)
    yield handle
    gpu_ray.kill(handle)


def free_bytes() -> int:
    """Free memory of this GPU, all processes together."""
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_sleep_frees_and_wake_restores_engine_memory(gpu_ray, engine, policy_dir):
    from transformers import AutoConfig

    from trainers.runtime.presets import count_params

    weights = count_params(AutoConfig.from_pretrained(str(policy_dir))) * 2  # bf16, tied embedding once
    seqs = random_sequences(4, 64, TOKENS)
    before = gpu_ray.get(engine.prompt_logprobs.remote(seqs))
    awake = free_bytes()
    assert gpu_ray.get(engine.sleep.remote()) is True
    asleep = free_bytes()
    assert gpu_ray.get(engine.health.remote())["sleeping"] is True
    gpu_ray.get(engine.wake_up.remote(["weights"]))
    weights_back = free_bytes()
    gpu_ray.get(engine.wake_up.remote(["kv_cache"]))
    back = free_bytes()
    after = gpu_ray.get(engine.prompt_logprobs.remote(seqs))
    found = {
        "weights_gib": weights / GIB,
        "kv_cache_gib": KV_CACHE_BYTES / GIB,
        "freed_by_sleep_gib": (asleep - awake) / GIB,
        "taken_by_wake_weights_gib": (asleep - weights_back) / GIB,
        "taken_by_wake_kv_cache_gib": (weights_back - back) / GIB,
        "logprob_change_after_wake": mean_abs_diff(before, after),
    }
    record("sleep_wake", found)
    assert asleep - awake >= 0.8 * (weights + KV_CACHE_BYTES), found
    assert 0.8 * weights <= asleep - weights_back <= weights + GIB, found  # the weights alone came back
    assert abs(back - awake) <= GIB // 2, found  # and then everything
    assert gpu_ray.get(engine.health.remote())["sleeping"] is False
    assert found["logprob_change_after_wake"] < 1e-3, found  # level 1 kept the weights in host memory


def test_cuda_ipc_sync_between_the_wakes_gives_the_new_weights(gpu_ray, engine, policy_dir):
    """The colocated sync: sleep, wake the weights, push through CUDA IPC from this process (same GPU),
    wake the KV cache; the engine's log-probs then match the pushed model's, not the start-up one's."""
    from cluster.weight_sync import CudaIpcSync

    model = load_model(policy_dir)
    sharpen(model, 4.0)
    seqs = random_sequences(4, 64, TOKENS, seed=1)
    expected = hf_logprobs(model, seqs)
    stale = mean_abs_diff(gpu_ray.get(engine.prompt_logprobs.remote(seqs)), expected)
    gpu_ray.get(engine.sleep.remote())
    gpu_ray.get(engine.wake_up.remote(["weights"]))
    named = list(model.named_parameters(remove_duplicate=False))  # lm_head too: vLLM's reload unties it
    stats = CudaIpcSync([engine]).push(named)
    gpu_ray.get(engine.wake_up.remote(["kv_cache"]))
    synced = mean_abs_diff(gpu_ray.get(engine.prompt_logprobs.remote(seqs)), expected)
    found = {"stale_mean_abs": stale, "synced_mean_abs": synced, **stats}
    record("cuda_ipc_sync", found)
    assert stats["tensors"] == len(named), found
    assert stale > 1.0, found  # the pushed model is another model
    assert synced < 0.05 * stale, found
