"""CPU weight-sync bandwidth (issue 17): the gloo broadcast transport against the safetensors blob
transport, side by side, into the same real vLLM engines, for the same model.

    python tests/bench/weight_sync.py                                  # tiny and small presets, 2 engines
    python tests/bench/weight_sync.py --presets tiny --pushes 3 --engines 1 --json /tmp/ws.json   # smoke

For each preset a random model is built locally (the preset's config, a byte-level BPE vocabulary trained
in a second) and saved; ``--engines`` vLLM engines start from it in Ray (CPU bundles); this process plays
the policy's rank 0 and pushes the model's full state dict (tied names included, as the policy does)
``--pushes`` times with each transport, alternating blob and broadcast so that a change of machine load
falls on both. One push before the timed ones forms the broadcast group and warms both paths. The limit
shown beside them is a plain ``torch`` copy of the same tensors into preallocated buffers, once per
engine (what any transport must at least do on one machine; the fastest of the repeats).

Results: ``tests/bench/results/weight_sync_cpu.json`` (``--json``): per preset and transport the bytes of
one push, each push's seconds, the median, bytes/s (bytes of one push x engines / median seconds: what
reached the engines), broadcast/blob speed ratio; plus the machine and code identity.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from tests.bench._bench_runs import code_identity, environment  # noqa: E402

TAG = "weight_sync"
DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "weight_sync_cpu.json"
TRANSPORTS = ("blob", "broadcast")


def build_model(preset: str, root: Path) -> Path:
    """A random model of ``preset`` saved (safetensors + config) at ``root/preset``."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.data.tokenizer import train_tokenizer
    from trainers.runtime.presets import build_config

    texts = [f"the fox {i} jumps over {i * 7} lazy dogs and cats" for i in range(300)]
    tok = train_tokenizer(texts, root / f"{preset}-tok", vocab_size=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(preset, tok)).float()
    model.save_pretrained(root / preset)
    tok.save_pretrained(root / preset)
    return root / preset


def start_engines(model_dir: Path, count: int, name: str):
    """``count`` RolloutEngine actors on CPU bundles; returns (actors, group, placements)."""
    import ray

    from actors.rollout import RolloutEngine, read_eos_ids
    from cluster.actor_group import ActorGroup
    from cluster.placement import place_roles

    placements = place_roles({"rollout": [{"CPU": 1.0}] * count}, colocated=False, timeout_s=120, name=name)
    group = ActorGroup(
        RolloutEngine,
        placements["rollout"],
        run_name=name,
        init_args=(str(model_dir),),
        init_kwargs={
            "device": "cpu",
            "dtype": "float32",
            "kv_cache_memory_bytes": 64 * 2**20,
            "max_model_len": 256,
            "eos_token_ids": read_eos_ids(str(model_dir)),
        },
        rank_kwargs=lambda rank: {"seed": rank},
    )
    ray.get([a.health.remote() for a in group.actors])
    return group.actors, group, placements


def torch_copy_seconds(state: dict, copies: int, repeats: int) -> float:
    """Fastest seconds to copy every tensor of ``state`` ``copies`` times into preallocated buffers (the
    fastest: this is a limit, and the first passes fault the buffers' pages in)."""
    import torch

    dst = [[torch.empty_like(t) for t in state.values()] for _ in range(copies)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for buffers in dst:
            for b, t in zip(buffers, state.values(), strict=True):
                b.copy_(t)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_preset(preset: str, args: argparse.Namespace, root: Path) -> dict:
    """Build, start, push with each transport; the preset's numbers."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.placement import release
    from cluster.weight_sync import BroadcastSync, CpuBlobSync, tensor_bytes, vllm_named_weights

    model_dir = build_model(preset, root)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    nbytes = sum(tensor_bytes(t) for _, t in vllm_named_weights(state.items()))
    actors, group, placements = start_engines(model_dir, args.engines, f"wsbench-{preset}")
    bucket = args.bucket_mb * 2**20
    syncs = {
        "blob": CpuBlobSync(actors, bucket_bytes=bucket),
        "broadcast": BroadcastSync(actors, ray.util.get_node_ip_address(), 0, "gloo", bucket_bytes=bucket),
    }
    seconds: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    try:
        for name in TRANSPORTS:
            syncs[name].push(state.items())  # warm-up (and the broadcast group's setup)
        for _ in range(args.pushes):
            for name in TRANSPORTS:
                start = time.perf_counter()
                stats = syncs[name].push(state.items())
                seconds[name].append(time.perf_counter() - start)
                assert stats["bytes"] == nbytes, (name, stats)
    finally:
        syncs["broadcast"].close()
        group.kill()
        release(placements)
    limit = torch_copy_seconds(state, args.engines, max(5, args.pushes))
    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_per_push": nbytes,
        "engines": args.engines,
        "bucket_bytes": bucket,
        "torch_copy": {"seconds": limit, "bytes_per_s": nbytes * args.engines / limit},
    }
    for name in TRANSPORTS:
        med = statistics.median(seconds[name])
        out[name] = {"seconds": seconds[name], "median_s": med, "bytes_per_s": nbytes * args.engines / med}
    out["broadcast_over_blob_speed"] = out["broadcast"]["bytes_per_s"] / out["blob"]["bytes_per_s"]
    return out


def table(results: dict) -> str:
    lines = [f"{'preset':8} {'MB/push':>8} {'transport':10} {'median s':>9} {'MB/s':>9}"]
    for preset, r in results["presets"].items():
        for name in (*TRANSPORTS, "torch_copy"):
            t = r[name]
            med = t.get("median_s", t.get("seconds"))
            lines.append(
                f"{preset:8} {r['bytes_per_push'] / 2**20:8.2f} {name:10} {med:9.4f} {t['bytes_per_s'] / 2**20:9.1f}"
            )
        lines.append(f"{preset:8} broadcast / blob speed: {r['broadcast_over_blob_speed']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small", help="model presets (trainers/runtime/presets.py)")
    parser.add_argument("--engines", type=int, default=2, help="vLLM engines receiving every push")
    parser.add_argument("--pushes", type=int, default=10, help="timed pushes per transport")
    parser.add_argument("--bucket-mb", type=int, default=256, help="bucket size in MiB (the default's)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where the results go")
    args = parser.parse_args(argv)

    from cluster.connect import connect
    from trainers.files import atomic_write_json

    started = time.time()
    env = environment(started, code_identity())
    connect(None, num_cpus=8, torch_threads=1)
    results = {"experiment": "weight sync bandwidth, CPU: gloo broadcast vs safetensors blob", "presets": {}}
    with tempfile.TemporaryDirectory(prefix="wsbench-") as tmp:
        for preset in args.presets.split(","):
            results["presets"][preset] = bench_preset(preset, args, Path(tmp))
            print(f"{TAG}: {preset} done", flush=True)
    results |= {
        "command": " ".join(sys.argv),
        "environment": env,
        "wall_time_s": round(time.time() - started, 1),
    }
    atomic_write_json(Path(args.json), results)
    print(table(results), flush=True)
    print(f"{TAG}: results in {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
