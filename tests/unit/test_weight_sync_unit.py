"""Bucketing, serialisation and naming of weights sent to vLLM (no Ray, no vLLM)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from cluster.weight_sync import iter_buckets, serialize_bucket, tensor_bytes, vllm_name, vllm_named_weights


def state_dict():
    torch.manual_seed(0)
    # float32: 4 bytes per element
    return {
        "model.embed_tokens.weight": torch.randn(16, 8),  # 512 B
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),  # 256 B
        "model.layers.0.self_attn.k_proj.weight": torch.randn(8, 8),  # 256 B
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 8),  # 1024 B, larger than a bucket
        "model.norm.weight": torch.randn(8),  # 32 B
        "lm_head.weight": torch.randn(16, 8),  # 512 B
    }


def test_buckets_keep_every_tensor_in_order_and_respect_the_size():
    sd = state_dict()
    buckets = list(iter_buckets(sd.items(), bucket_bytes=600))
    names = [n for b in buckets for n, _ in b]
    assert names == list(sd)  # all tensors, original order
    assert all(t is sd[n] for b in buckets for n, t in b)  # no copies
    sizes = [sum(tensor_bytes(t) for _, t in b) for b in buckets]
    assert sizes == [512, 512, 1024, 544]
    for bucket, size in zip(buckets, sizes, strict=True):
        assert size <= 600 or len(bucket) == 1  # only a lone oversized tensor may exceed


def test_one_big_bucket_when_everything_fits():
    sd = state_dict()
    buckets = list(iter_buckets(sd.items(), bucket_bytes=10**9))
    assert len(buckets) == 1 and len(buckets[0]) == len(sd)


def test_bucket_size_must_be_positive():
    with pytest.raises(ValueError):
        list(iter_buckets(state_dict().items(), 0))


def test_serialize_round_trip_with_tied_and_non_contiguous_tensors():
    emb = torch.randn(16, 8)
    bucket = [("model.embed_tokens.weight", emb), ("lm_head.weight", emb), ("t", torch.randn(8, 4).t())]
    out = load(serialize_bucket(bucket))
    assert sorted(out) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "t",
    ]  # safetensors sorts its own way
    for name, tensor in bucket:
        assert torch.equal(out[name], tensor)


def test_names_for_vllm():
    assert vllm_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert vllm_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert vllm_name("model.norm.weight") == "model.norm.weight"
    pairs = [
        ("module.model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(2)),
        ("module.lm_head.weight", torch.ones(2)),
    ]
    assert [n for n, _ in vllm_named_weights(pairs)] == ["lm_head.weight"]


def test_every_engine_method_the_transports_call_exists():
    """The GPU transports cannot run here: at least their calls must name real RolloutEngine methods."""
    import ast
    import inspect

    import cluster.weight_sync as ws
    from actors.rollout import RolloutEngine

    called = {
        node.value.attr
        for node in ast.walk(ast.parse(inspect.getsource(ws)))
        if isinstance(node, ast.Attribute) and node.attr == "remote" and isinstance(node.value, ast.Attribute)
    }
    assert {
        "update_weights",
        "init_weight_broadcast",
        "receive_weight_broadcast",
        "update_weights_ipc",
    } <= called
    assert all(callable(getattr(RolloutEngine, name, None)) for name in called), called
