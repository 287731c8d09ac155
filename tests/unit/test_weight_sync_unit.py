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


# --- the broadcast transport's pure parts and its group (cluster/weight_broadcast.py) -------------


def mixed_bucket():
    """Several dtypes interleaved, a tied pair (one storage) and a non-contiguous tensor."""
    torch.manual_seed(1)
    emb = torch.randn(16, 8)
    return [
        ("model.embed_tokens.weight", emb),
        ("model.layers.0.input_layernorm.weight", torch.randn(8).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 4).t()),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(4, 8).to(torch.float16)),
        ("model.norm.weight", torch.randn(8).to(torch.bfloat16)),
        ("counts", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        ("lm_head.weight", emb),
    ]


def test_flatten_is_one_buffer_per_dtype_and_unflatten_gives_every_tensor_back():
    from cluster.weight_broadcast import BucketLayout, empty_buffers, flatten_bucket, unflatten_bucket

    bucket = mixed_bucket()
    layout, buffers = flatten_bucket(bucket)
    assert layout.buffers == [("float32", 16 * 8 + 32 + 128), ("bfloat16", 16), ("float16", 32), ("int64", 6)]
    assert [b.dtype for b in buffers] == [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    assert all(b.is_contiguous() and b.dim() == 1 for b in buffers)
    # what crosses Ray is plain data; the receiver rebuilds the layout and fills fresh buffers
    received = BucketLayout.from_dict(layout.as_dict())
    assert received == layout
    fresh = empty_buffers(received)
    for dst, src in zip(fresh, buffers, strict=True):
        dst.copy_(src)
    out = unflatten_bucket(received, fresh)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    # views, not copies: the receiver allocates once per bucket
    assert out[0][1].untyped_storage().data_ptr() == fresh[0].untyped_storage().data_ptr()


def test_choose_transport_table_and_refusals():
    from trainers.config.transport import CPU_DEFAULT, choose_transport

    assert choose_transport("cuda", "colocated") == "ipc"
    assert choose_transport("cuda", "dedicated") == "broadcast"
    assert choose_transport("cpu", "dedicated") == CPU_DEFAULT == "blob"
    assert choose_transport("cpu", "colocated") == CPU_DEFAULT
    assert choose_transport("cpu", "dedicated", "broadcast") == "broadcast"
    assert choose_transport("cuda", "colocated", "blob") == "blob"
    for device, placement in (("cpu", "colocated"), ("cuda", "dedicated")):
        with pytest.raises(ValueError, match="ipc needs"):
            choose_transport(device, placement, "ipc")
    with pytest.raises(ValueError, match="NCCL refuses"):
        choose_transport("cuda", "colocated", "broadcast")
    with pytest.raises(ValueError, match="must be one of"):
        choose_transport("cpu", "dedicated", "nccl")


def test_config_refuses_a_transport_that_fits_no_device():
    from trainers.config.run import Config
    from trainers.errors import ConfigError

    cfg = Config()
    cfg.rollout.weight_sync = "ipc"
    cfg.cluster.device = "cpu"
    with pytest.raises(ConfigError, match="rollout.weight_sync=ipc"):
        cfg.validate()
    cfg.cluster.device, cfg.cluster.placement = "auto", "colocated"  # auto may resolve to cuda
    cfg.validate()


def test_push_keeps_at_most_max_inflight_buckets_outstanding(monkeypatch):
    import cluster.weight_sync as ws

    class Engine:
        def __getattr__(self, name):
            return type("M", (), {"remote": staticmethod(lambda *a: None)})

    class Fake(ws.WeightSync):
        max_inflight_buckets = 3

        def __init__(self):
            super().__init__([Engine(), Engine()], bucket_bytes=256)
            self.outstanding, self.most = [], 0

        def _send(self, bucket):
            self.outstanding.append(len(bucket))
            self.most = max(self.most, len(self.outstanding))
            return ["ref"]

        def _wait(self, refs):
            n = self.outstanding.pop(0)
            return [n, n]

    monkeypatch.setattr(ws.ray, "get", lambda refs: refs)
    sync = Fake()
    stats = sync.push((f"t{i}", torch.zeros(64)) for i in range(10))  # 256 B each: 10 buckets
    assert stats["buckets"] == 10 and stats["tensors"] == 10
    assert sync.most == 3 and sync.outstanding == []


def _join_then(port: int, action: str) -> None:
    """Rank 1 of a 2-rank weight group: joins, receives one bucket, then dies or stays silent."""
    import os
    import time

    from cluster.weight_broadcast import join_group

    group = join_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=3.0)
    buf = torch.empty(4)
    group.broadcast(buf).wait()
    if action == "die":
        os._exit(1)
    time.sleep(10)  # alive but never joins the next broadcast


@pytest.mark.parametrize("action", ["die", "hang"])
def test_a_lost_or_silent_peer_fails_the_broadcast_instead_of_blocking(action):
    import multiprocessing
    import time

    from cluster.weight_broadcast import host_store, join_group

    store = host_store("127.0.0.1", 0, 2, timeout_s=30.0)
    child = multiprocessing.get_context("spawn").Process(target=_join_then, args=(store.port, action))
    child.start()
    try:
        group = join_group("gloo", "127.0.0.1", store.port, 0, 2, timeout_s=3.0, store=store)
        group.broadcast(torch.arange(4.0)).wait()  # the group works
        time.sleep(1.0 if action == "die" else 0.0)
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            group.broadcast(torch.zeros(2**20)).wait()  # 4 MiB: more than the socket buffers hold
        assert time.monotonic() - start < 6.0  # the dead peer at once, the silent one at the timeout
    finally:
        child.kill()
        child.join()
