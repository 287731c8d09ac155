"""Non-finite losses and gradients: skipped on every rank, counted, and a streak stops the run.

- ``StepGuard`` on real DeepSpeed engines (2 gloo processes, ZeRO-0 and ZeRO-3): a NaN loss on rank 0
  only, and an inf gradient with a finite loss on rank 1 only, are both skipped on *both* ranks, and
  the weights and LR afterwards are bit-identical to a run that never saw those steps.
- PPO (fault injection through ``RLHF_FAULT_NONFINITE_STEPS``, trainers/runtime/nonfinite.py): (a) a 2-iteration
  run (micro-batches by a token budget) with 3 poisoned steps finishes, counts them in ``policy/skipped_steps``/``value/skipped_steps``,
  saves finite weights and the critic's streak in its checkpoint; (b) ``rlhf ppo`` continuing it to 4
  iterations with two more poisoned critic steps stops (exit 3, one line) because the streak carried
  over from the checkpoint reaches 3, naming that checkpoint, which is untouched (same hashes).
- SFT (``RLHF_FAULT_NONFINITE_STEPS`` too, forwarded to the Ray Train workers): a skipped step is counted and logged; 3 in a row stop the run with
  RunStopped (Ray Train does not retry it), nothing saved after them; the same command then resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, subprocess_env
from tests.integration.conftest import PPO_TEST_OVERRIDES, run_stage_for_test

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


# --------------------------------------------------------------------------------------------------
# StepGuard on real DeepSpeed engines
# --------------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _rank_main(rank: int, world: int, port: int, stages: list[int], queue) -> None:
    """One rank, for each ZeRO stage: engine A runs good, bad-loss, bad-grad, good steps; engine B only
    the good ones."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    import deepspeed

    from trainers.runtime.dist import init_distributed
    from trainers.runtime.step_guard import StepGuard
    from trainers.runtime.zero import ds_config, init_deepspeed

    init_distributed("cpu")
    data = [torch.randn(2, 8, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def make(stage: int):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        config = ds_config(stage, "fp32", micro_batch=2, grad_accum=2, world_size=world, grad_clip=1.0)
        return init_deepspeed(model, config, lr=1e-2, total_steps=10, warmup_ratio=0.0, min_lr_ratio=0.5)

    def step(engine, k: int, fault: str | None) -> bool:
        guard = StepGuard(engine)
        for i in range(2):
            y = engine(data[(2 * k + i + 5 * rank) % len(data)])  # (2, 1)
            if fault == "grad" and rank == 1 and i == 1:
                y = _InfGrad.apply(y)  # every parameter's gradient becomes inf, the loss stays finite
            loss = (y**2).mean()
            if fault == "loss" and rank == 0 and i == 0:
                loss = loss + math.nan  # gradients stay finite: only the loss check sees it
            guard.backward_step(loss, last=i == 1)
        return guard.applied

    def flat(engine) -> torch.Tensor:
        parts = []
        for p in engine.module.parameters():
            with deepspeed.zero.GatheredParameters([p]):
                parts.append(p.detach().clone().flatten())
        return torch.cat(parts)

    for stage in stages:
        a, b = make(stage), make(stage)
        start = flat(a)
        applied = [step(a, 0, None), step(a, 1, "loss"), step(a, 1, "grad"), step(a, 2, None)]
        reference = [step(b, 0, None), step(b, 2, None)]
        wa, wb = flat(a), flat(b)
        queue.put(
            {
                "stage": stage,
                "rank": rank,
                "applied": applied,
                "reference": reference,
                "max_diff": float((wa - wb).abs().max()),
                "moved": float((wa - start).abs().max()),
                "finite": bool(torch.isfinite(wa).all()),
                "lr": (a.get_lr()[0], b.get_lr()[0]),
                "skipped_steps": a.skipped_steps,
            }
        )


def test_step_guard_skips_on_every_rank_and_leaves_no_trace():
    """ZeRO-3 (DeepSpeed's own overflow path) and ZeRO-0 (our check of the gradients), 2 ranks each."""
    import torch.multiprocessing as mp

    stages = [0, 3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, stages, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600) for _ in range(len(procs) * len(stages))]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert sorted((r["stage"], r["rank"]) for r in results) == [(0, 0), (0, 1), (3, 0), (3, 1)]
    for r in results:
        assert r["applied"] == [True, False, False, True], r  # both bad steps skipped on both ranks
        assert r["reference"] == [True, True]
        assert r["max_diff"] == 0.0 and r["moved"] > 0 and r["finite"], r  # as if they never happened
        assert r["lr"][0] == r["lr"][1]  # the LR schedule did not advance for skipped steps
        assert r["skipped_steps"] == 2


# --------------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------------

PPO_OVERRIDES = [
    *PPO_TEST_OVERRIDES,
    "ppo.checkpoint_every=2",
    "ppo.max_nonfinite_steps=3",
    "ppo.micro_batch_tokens=160",
]
"""Micro-batches by a token budget here (docs/design.md, "Token-budget micro-batches (issue 17)"): the
shared run's micro-batches of 4 rows compute 4 x (P+R) ~ 240 slots; 160 gives a count that varies by step
and rank before the ranks are made equal, so this run also shows the packed no-grad passes, the policy's
and critic's varying accumulation and the skip path together on real ZeRO-3 ranks."""


def _hashes(directory: Path) -> dict[str, tuple[str, int]]:
    """``relative path -> (sha256, mtime_ns)`` of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ppo_inputs(world_dir, sft_model_dir, rm_model_dir) -> list[str]:
    return [f"data.dir={world_dir}", f"model.path={sft_model_dir}", f"reward.path={rm_model_dir}"]


@pytest.fixture(scope="module")
def skipped_run(ray_local, ppo_inputs, tmp_path_factory):
    """(a): 2 iterations; policy steps 2 and 3 and critic step 8 (the last of iteration 2) poisoned."""
    from cluster.faults import NONFINITE_ENV as FAULT_ENV
    from trainers.config import load_config
    from trainers.ppo.driver import run_ppo
    from trainers.runs.metrics import read_metrics

    out = tmp_path_factory.mktemp("nonfinite") / "ppo"
    cfg = load_config(TINY_CONFIG, [*ppo_inputs, *PPO_OVERRIDES, "ppo.iterations=2"])
    os.environ[FAULT_ENV] = "policy:2,3;critic:8"
    try:
        summary = run_ppo(cfg, out)
    finally:
        del os.environ[FAULT_ENV]
    return out, summary, read_metrics(out / "metrics.jsonl")


def test_ppo_poisoned_steps_are_skipped_counted_and_the_run_finishes(skipped_run, sft_model_dir):
    from safetensors.torch import load_file

    out, summary, records = skipped_run
    assert [r["step"] for r in records] == [1, 2] and summary["ppo/iterations"] == 2
    assert [r["policy/skipped_steps"] for r in records] == [2.0, 0.0]
    assert [r["value/skipped_steps"] for r in records] == [0.0, 1.0]
    for r in records:  # the token budget's layout: rows cut to their real columns, grouped by length
        assert 0 <= r["policy/padding_fraction"] < 0.5 and r["policy/micro_batches"] >= 1, r
    for r in records:  # means over the applied steps only: nothing NaN leaks into the metrics
        for key in ("loss/policy", "loss/ptx", "loss/value", "policy/grad_norm", "policy/approx_kl"):
            assert r[key] is not None and math.isfinite(r[key]), (r["step"], key)
    policy, sft = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(sft_model_dir / "model.safetensors")),
    )
    assert all(torch.isfinite(t).all() for t in policy.values())
    assert any(not torch.equal(policy[k], sft[k]) for k in sft)  # the applied steps did train
    state = json.loads((out / "checkpoints" / "iter_000002" / "driver_state.json").read_text())
    assert state["nonfinite_streak"] == {"policy": 0, "critic": 1}  # the streak goes into the checkpoint


def test_ppo_streak_across_a_resume_stops_with_one_line_and_the_checkpoint_intact(
    skipped_run, ppo_inputs, tmp_path
):
    """(b): the same command with ppo.iterations=4 resumes from iter_000002 (critic streak 1) and poisons
    critic steps 9 and 10: 3 in a row -> exit 3 during iteration 3, nothing saved after iteration 2."""
    from cluster.faults import NONFINITE_ENV as FAULT_ENV

    out = skipped_run[0]
    checkpoint = out / "checkpoints" / "iter_000002"
    before = _hashes(out / "checkpoints")
    env = subprocess_env(own_ray=True, **{FAULT_ENV: "critic:9,10"})
    args = [
        sys.executable, "-m", "trainers.cli", "ppo", "--config", str(TINY_CONFIG), "--out", str(out),
        *ppo_inputs, *PPO_OVERRIDES, "ppo.iterations=4",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"resumed from {checkpoint}" in proc.stdout
    assert "Traceback" not in proc.stderr
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("rlhf: stopped:")]
    assert len(stopped) == 1, proc.stderr[-3000:]
    assert stopped[0].startswith("rlhf: stopped: ppo iteration 3, critic: 3 optimizer steps in a row")
    assert stopped[0].endswith(f"resume from {checkpoint}")
    assert _hashes(out / "checkpoints") == before  # untouched: no newer checkpoint, no .tmp, same files
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # iteration 3 never completed


# --------------------------------------------------------------------------------------------------
# A Ray Train stage (SFT)
# --------------------------------------------------------------------------------------------------


def test_sft_skips_a_poisoned_step_and_a_streak_stops_it(base_model_dir, world_dir, tmp_path, monkeypatch):
    """Steps 2, 4, 5, 6 poisoned on rank 0, limit 3, checkpoints every 2: step 2 skipped and counted,
    step 4's checkpoint holds streak 1, step 6 makes 3 in a row -> RunStopped naming step 4's checkpoint,
    no checkpoint or model after it. The same command without the fault resumes from step 4."""
    from cluster.faults import NONFINITE_ENV
    from trainers.errors import RunStopped
    from trainers.runs.metrics import read_metrics

    out = tmp_path / "sft"
    extra = [
        "sft.max_steps=8",
        "sft.checkpoint_every=2",
        "sft.max_nonfinite_steps=3",
        "sft.keep_checkpoints=10",
    ]
    monkeypatch.setenv(NONFINITE_ENV, "sft:2,4-6")
    with pytest.raises(RunStopped) as err:
        run_stage_for_test("sft", out, world_dir, base_model_dir, extra, max_failures=2)
    monkeypatch.delenv(NONFINITE_ENV)
    storage = out / "checkpoints" / "sft"
    assert str(err.value).startswith("sft step 6: 3 optimizer steps in a row")
    assert str(err.value).endswith(f"resume from {storage / 'step_0000004'}")
    assert sorted(p.name for p in storage.glob("step_*")) == ["step_0000002", "step_0000004"]
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # not retried by Ray Train (max_failures=2)
    assert [r["skipped"] for r in records] == [0, 1, 0, 1, 1, 1]
    assert records[1]["loss"] is None and math.isfinite(records[2]["loss"])  # NaN is logged as null
    saved = json.loads((storage / "step_0000004" / "trainer_state.json").read_text())["loop"]
    assert saved["nonfinite_streak"] == 1 and saved["skipped_steps"] == 2

    resumed = run_stage_for_test("sft", out, world_dir, base_model_dir, extra)
    assert resumed.summary["sft/resumed_from_step"] == 4 and resumed.summary["sft/steps"] == 8
    assert resumed.summary["sft/skipped_steps"] == 2 and math.isfinite(resumed.summary["sft/train_loss"])
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9)) and [r["skipped"] for r in records[4:]] == [
        0
    ] * 4
