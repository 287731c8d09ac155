"""A bf16 PPO loop on one GPU: ``rlhf ppo`` with the shipped 1-GPU config (trainers/configs/qwen2.5-0.5b-1gpu.yaml:
colocated placement, ZeRO-3, GAE with a critic from the RM) on Qwen2.5-0.5B-shaped models, shrunk to two
short iterations; every metric of both iterations is finite and the engines' sleep and the weight sync ran.

The command starts its own Ray (one GPU, five roles sharing it); what it logged goes to
``$RLHF_GPU_RESULTS/ppo_loop.json``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env
from tests.gpu.gpu_models import record, write_prompts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = REPO / "trainers" / "configs" / "qwen2.5-0.5b-1gpu.yaml"
ITERATIONS = 2
OVERRIDES = [
    f"ppo.iterations={ITERATIONS}",
    "ppo.prompts_per_iteration=16",
    "ppo.samples_per_prompt=2",
    "ppo.mini_batch_size=16",  # 32 rows: 2 optimizer steps per iteration
    "ppo.micro_batch_size=4",
    "ppo.checkpoint_every=0",  # only the final checkpoint
    "ppo.keep_checkpoints=1",
    "model.max_len=512",
    "rollout.max_new_tokens=64",
    "rollout.enforce_eager=true",  # no CUDA-graph capture at start-up
    "rollout.gpu_memory_utilization=0.15",
]
"""The shipped config, small: 32 responses of at most 64 tokens per iteration."""


def test_bf16_ppo_loop_on_a_05b_shape_has_finite_metrics(policy_dir, reward_dir, tmp_path):
    data = write_prompts(tmp_path / "data")
    out = tmp_path / "ppo"
    args = [
        sys.executable, "-m", "trainers.cli", "ppo", "--config", str(CONFIG), "--out", str(out),
        f"model.path={policy_dir}", f"reward.path={reward_dir}", f"data.dir={data}", *OVERRIDES,
    ]  # fmt: skip
    proc = subprocess.run(
        args, env=subprocess_env(own_ray=True), cwd=REPO, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, f"rlhf ppo exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record("ppo_loop", {"iterations": rows, "stdout_tail": proc.stdout[-3000:]})
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    for row in rows:
        bad = {k: v for k, v in row.items() if not (isinstance(v, int | float) and math.isfinite(v))}
        assert bad == {}, f"iteration {row['step']}: non-finite or missing metrics {bad}"
        assert row["sync/bytes"] > 0.9e9  # the whole 0.5B bf16 policy reached the engine
        assert row["timing/train"] > 0
    assert (out / "model" / "config.json").is_file()
