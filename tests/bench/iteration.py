"""The iteration benchmark (issue 17): where one PPO-ptx iteration's time goes, and how close each phase is to
its own limit on this machine.

    python tests/bench/iteration.py                       # tiny and small presets, ~2-3 min each on 2 cores
    python tests/bench/iteration.py --presets tiny --iterations 5

For each preset (``model.preset``; ``trainers/configs/tiny.yaml``'s PPO settings otherwise) one child
process runs our iteration -- real Ray actors, DeepSpeed ZeRO-3 over gloo, a vLLM engine actor -- for
``--warmup`` + ``--iterations`` iterations, timing each (the driver's ``timing/*`` phases and the whole
``run_iteration`` call), and after each, while the actors idle, the same work in that one process
(``_iteration_reference.py``):

- (a) generation: vLLM in-process, the same prompts, sampling settings and request seeds -> gen tokens/s;
- (b) training: plain torch forward/backward + AdamW of the same micro-batches (same plan) -> train tokens/s;
- (c) sync: a plain copy of the same weight bytes -> bytes/s;
- (d) driver overhead: (iteration - generate - experience - train - sync) / iteration;
- (e) the one-process reference iteration: (a) + the four passes + advantages + (b) + (c); ours / it.

Results: ``tests/bench/results/iteration_cpu.json`` (``--json``), keyed by preset (a run of some presets keeps
the others'), with per-iteration rows, medians and the machine. Write-up: docs/design.md, "Iteration
benchmark (issue 17)".

Decisions:

- **Models**: randomly initialised ``model.preset`` models with the synthetic world's tokenizer, saved as
  the SFT and RM directories (built in a few seconds; the benchmark measures speed, not learning). A random
  policy never samples a stop id, so every response is ``rollout.max_new_tokens`` long: the same shapes in
  every iteration, for ours and the reference alike.
- **Same data**: the reference repeats our engine calls (captured from ``trainers.ppo.sampling.generate``)
  and trains on our iteration's experience and plan (captured from ``trainers.ppo.driver.train``), so
  both sides do the same work on the same shapes.
- **Side by side**: each reference iteration runs right after the iteration of ours it repeats, so a
  change of the shared machine's load hits both alike. **Medians** over the measured iterations; a run holds ``/tmp/rlhf_itest.lock`` while it measures (the
  machine is shared), and the load average at start is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

TAG = "iteration"
DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "iteration_cpu.json"
PRESETS = ("tiny", "small")
LOCK = "/tmp/rlhf_itest.lock"
PHASES = ("generate", "experience", "train", "sync")
WORLD_SCALE = 0.1
"""Synthetic world size: prompts and pretraining text enough for a few iterations."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def build_inputs(root: Path, preset: str) -> tuple[Path, Path, Path]:
    """``(world, sft, rm)`` under ``root``: the synthetic world and random ``preset`` models with its tokenizer."""
    import torch

    from trainers.data.tokenizer import load_tokenizer
    from trainers.data.world import synthesize
    from trainers.runtime.models import build_causal_lm, build_reward_model

    world, sft, rm = root / "world", root / f"{preset}_sft", root / f"{preset}_rm"
    if not (world / "summary.json").is_file():
        synthesize(world, seed=0, scale=WORLD_SCALE)
    tok = load_tokenizer(world / "tokenizer")
    if not (sft / "config.json").is_file():
        torch.manual_seed(0)
        build_causal_lm(preset=preset, tokenizer=tok).save_pretrained(str(sft))
        tok.save_pretrained(str(sft))
    if not (rm / "config.json").is_file():
        build_reward_model(sft, tok.pad_token_id).save_pretrained(str(rm))
        tok.save_pretrained(str(rm))
    return world, sft, rm


def bench_config(preset: str, world: Path, sft: Path, rm: Path, iterations: int, extra: Sequence[str]):
    """tiny.yaml's settings with ``preset``'s models; no checkpoints, no evaluation, no progress lines."""
    from trainers.config import load_config

    overrides = [
        f"model.preset={preset}",
        f"data.dir={world}",
        f"model.path={sft}",
        f"reward.path={rm}",
        f"ppo.iterations={iterations}",
        *extra,
    ]
    return load_config(REPO / "trainers" / "configs" / "tiny.yaml", overrides)


# --------------------------------------------------------------------------------------------------
# Our iteration
# --------------------------------------------------------------------------------------------------


def run_side_by_side(cfg, out: Path, warmup: int, iterations: int, threads: int):
    """``warmup + iterations`` iterations of our PPO on real actors, each followed by the one-process
    reference of the same work in this process (the actors idle meanwhile), so that a change of the
    machine's load hits both alike; ``(ours, reference)`` rows of the measured iterations."""
    import ray

    from actors.rollout import RolloutEngine
    from tests.bench._iteration_reference import Captured, Reference, reference_iteration, train_tokens
    from trainers import algos
    from trainers.ppo import driver, sampling
    from trainers.ppo.checkpoint import DriverState, run_shape
    from trainers.ppo.roles import check_resources, start_roles
    from trainers.ppo.schedule import derived_seed
    from trainers.ppo.scoring import RewardScorer
    from trainers.ppo.setup import rollout_kwargs, validate_run

    calls: list = []
    trained: list = []
    real_generate, real_train = sampling.generate, driver.train

    def generate(roles, prompts, sampling_, seed_of, what):
        bounds = sampling.contiguous_bounds(len(prompts), len(roles.engines()))
        calls.extend((list(prompts[lo:hi]), dict(sampling_), seed_of(e)) for e, (lo, hi) in enumerate(bounds))
        return real_generate(roles, prompts, sampling_, seed_of, what)

    def train(roles, experience, plan):
        trained.append((experience, plan))
        return real_train(roles, experience, plan)

    sampling.generate, driver.train = generate, train
    out, data = validate_run(cfg, out)
    device = check_resources(cfg)
    p = cfg.ppo
    clock = time.perf_counter()
    roles = start_roles(cfg, device, run_name=f"bench-{os.getpid()}", stop_ids=data.stop_ids)
    print(f"{TAG}: actors ready in {time.perf_counter() - clock:.1f}s", flush=True)
    kl_ctl = algos.make_kl_controller("fixed", p.kl_coef, p.kl_target, p.kl_horizon)
    state = DriverState(kl_controller=kl_ctl.state_dict(), shape=run_shape(cfg))
    scorer = RewardScorer(cfg, roles, data.stop_ids, data.tokenizer, out / "checkpoints")
    ours, reference = [], []
    try:
        clock = time.perf_counter()
        seed = derived_seed(p.seed, 10_000)
        engine = RolloutEngine(cfg.model.path, seed=seed, **rollout_kwargs(cfg, "cpu", data.stop_ids))
        ref = Reference(cfg, threads)
        print(f"{TAG}: in-process vLLM and reference models ready in {time.perf_counter() - clock:.1f}s")
        for i in range(warmup + iterations):
            calls.clear()
            kl = kl_ctl.value
            torch_threads(cfg.cluster.torch_threads)  # the driver's own setting during our iteration
            clock = time.perf_counter()
            m = driver.run_iteration(roles, cfg, data, state, kl_ctl, out / "checkpoints", scorer)
            total = time.perf_counter() - clock
            experience, plan = trained[-1]
            row = {ph: m[f"timing/{ph}"] for ph in PHASES}
            row["iteration"] = total
            row["other"] = total - sum(row[ph] for ph in PHASES)
            row["gen_tokens"] = int(experience.tokens.response_mask.sum())
            row["train_tokens"] = train_tokens(experience, plan)
            row["sync_bytes"] = m["sync/bytes"]
            ref_row = reference_iteration(ref, Captured(list(calls), experience, plan, kl), engine, threads)
            what = f"iteration {i + 1}{' (warm-up)' if i < warmup else ''}"
            print(f"{TAG}: {what}: ours: {phase_line(row)}", flush=True)
            print(f"{TAG}: {what}: reference: {phase_line(ref_row)}", flush=True)
            if i >= warmup:
                ours.append(row)
                reference.append(ref_row)
    finally:
        scorer.close()
        roles.shutdown()
        ray.shutdown()
        sampling.generate, driver.train = real_generate, real_train
    return ours, reference


def torch_threads(n: int) -> None:
    from tests.bench._iteration_reference import set_threads

    set_threads(n)


def phase_line(row) -> str:
    keys = [k for k in ("iteration", *PHASES, "other", "passes", "copy") if k in row]
    return ", ".join(f"{k} {row[k]:.3f}s" for k in keys)


# --------------------------------------------------------------------------------------------------
# One preset, in its own process
# --------------------------------------------------------------------------------------------------


def measure_preset(preset: str, root: Path, warmup: int, iterations: int, extra: Sequence[str]) -> dict:
    """Ours and the one-process reference side by side for ``preset``; the preset's results entry."""
    from tests.bench._iteration_reference import medians

    world, sft, rm = build_inputs(root, preset)
    cfg = bench_config(preset, world, sft, rm, warmup + iterations, extra)
    started = time.perf_counter()
    threads = os.cpu_count() or 1
    ours, ref = run_side_by_side(cfg, root / f"{preset}_run", warmup, iterations, threads)
    return summarize(preset, cfg, ours, ref, threads, medians, time.perf_counter() - started)


def summarize(preset, cfg, ours, ref, threads, medians, wall_s) -> dict:
    """The results entry of one preset: rows, medians and the ratios of issue 17."""
    o, r = medians(ours), medians(ref)
    p = cfg.ppo
    ratios = {
        "gen_tokens_per_s_vs_raw_vllm": (o["gen_tokens"] / o["generate"]) / (r["gen_tokens"] / r["generate"]),
        "train_tokens_per_s_vs_plain_torch": r["train"] / o["train"],
        "sync_bytes_per_s_vs_plain_copy": (o["sync_bytes"] / o["sync"]) / (r["sync_bytes"] / r["copy"]),
        "driver_overhead_fraction": statistics.median(x["other"] / x["iteration"] for x in ours),
        "iteration_vs_one_process_reference": o["iteration"] / r["iteration"],
        "train_vs_layout_bound": o["train"] / r["train_layout_bound"],
    }
    return {
        "preset": preset,
        "settings": {
            "prompts_per_iteration": p.prompts_per_iteration,
            "samples_per_prompt": p.samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "ppo_epochs": p.ppo_epochs,
            "mini_batch_size": p.mini_batch_size,
            "micro_batch_size": p.micro_batch_size,
            "ptx_coef": p.ptx_coef,
            "ptx_batch_size": p.ptx_batch_size,
            "policy_workers": p.policy_workers,
            "critic_workers": p.critic_workers,
            "torch_threads_per_actor": cfg.cluster.torch_threads,
            "reference_torch_threads": threads,
            "reference_generation": "vLLM in-process (actors.rollout.RolloutEngine without Ray)",
        },
        "ours": {"median": o, "iterations": ours},
        "reference": {"median": r, "iterations": ref},
        "throughput": {
            "ours_gen_tokens_per_s": o["gen_tokens"] / o["generate"],
            "raw_vllm_gen_tokens_per_s": r["gen_tokens"] / r["generate"],
            "ours_train_tokens_per_s": o["train_tokens"] / o["train"],
            "plain_train_tokens_per_s": o["train_tokens"] / r["train"],
            "ours_sync_bytes_per_s": o["sync_bytes"] / o["sync"],
            "plain_copy_bytes_per_s": r["sync_bytes"] / r["copy"],
        },
        "ratios": ratios,
        "wall_time_s": round(wall_s, 1),
    }


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PPO iteration benchmark: ours vs a one-process reference")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated model presets")
    p.add_argument("--iterations", type=int, default=3, help="measured iterations per preset")
    p.add_argument("--warmup", type=int, default=1, help="iterations before measuring")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--root", help="where inputs and runs go (default: a temporary directory)")
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} while measuring")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: measure this preset, write --entry
    p.add_argument("--entry", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every preset")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def child(args: argparse.Namespace) -> int:
    entry = measure_preset(args.one, Path(args.root), args.warmup, args.iterations, args.overrides)
    Path(args.entry).write_text(json.dumps(entry, indent=1))
    return 0


def machine() -> dict:
    from tests.bench._bench_runs import code_identity, environment

    return environment(time.time(), code_identity())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        return child(args)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"presets": {}}
    env = machine()
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as tmp:
        root = Path(args.root or tmp)
        for preset in [s for s in args.presets.split(",") if s]:
            entry = root / f"{preset}.entry.json"
            cmd = [sys.executable, __file__, "--one", preset, "--entry", str(entry), "--root", str(root)]
            cmd += ["--iterations", str(args.iterations), "--warmup", str(args.warmup), *args.overrides]
            if not args.no_lock:
                cmd = ["flock", LOCK, *cmd]
            print(f"{TAG}: {preset}: " + " ".join(cmd), flush=True)
            if subprocess.run(cmd, check=False).returncode != 0:
                print(f"{TAG}: error: the {preset} run failed", file=sys.stderr)
                return 1
            results["presets"][preset] = json.loads(entry.read_text()) | {"machine": env}
            print(f"{TAG}: {preset}: " + json.dumps(results["presets"][preset]["ratios"]), flush=True)
    results["experiment"] = (
        "PPO-ptx iteration: ours (Ray + DeepSpeed ZeRO-3 + vLLM) vs a one-process reference"
    )
    results["command"] = " ".join(["python tests/bench/iteration.py", *(argv or sys.argv[1:])])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{TAG}: results in {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
