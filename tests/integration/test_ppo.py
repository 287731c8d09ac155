"""PPO-ptx end to end on CPU: real Ray actors, DeepSpeed ZeRO-3 (2 policy ranks over gloo), one vLLM
engine, the tiny SFT model and reward model trained by the session fixtures (conftest.py).

One run (``ppo_reference`` of conftest.py: 6 iterations, adaptive KL, ptx on, checkpoints every 3, shared
with the fault tests) is inspected by most tests; the resume test continues a copy of it from its first
checkpoint and compares the iteration it redoes.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, subprocess_env, template_ids
from tests.integration.conftest import (
    PPO_REFERENCE_ITERATIONS,
    PPO_REFERENCE_OVERRIDES,
    PPORun,
    load_ppo_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ITERATIONS = PPO_REFERENCE_ITERATIONS
REQUIRED_METRICS = [
    "objective/kl",
    "objective/kl_coef",
    "objective/score",
    "objective/non_score_reward",
    "objective/reward_total",
    "loss/policy",
    "loss/value",
    "loss/ptx",
    "policy/clipfrac",
    "policy/approx_kl",
    "policy/entropy",
    "policy/ratio_mean",
    "policy/ratio_std",
    "value/clipfrac",
    "rollout/response_length",
    "rollout/eos_rate",
    "rollout/truncated_rate",
    "objective/penalised_responses",
    "rollout/vllm_logprob_diff",
    "timing/generate",
    "timing/experience",
    "timing/train",
    "timing/sync",
]


@pytest.fixture(scope="module")
def ppo_run(ppo_reference) -> PPORun:
    """The session's shared uninterrupted run (conftest.py)."""
    return ppo_reference


def test_every_iteration_logged_with_namespaced_metrics(ppo_run):
    assert [r["step"] for r in ppo_run.records] == list(range(1, ITERATIONS + 1))
    for record in ppo_run.records:
        missing = [k for k in REQUIRED_METRICS if k not in record]
        assert not missing, missing
        assert all(math.isfinite(record[k]) for k in REQUIRED_METRICS)
        assert all(record[k] > 0 for k in REQUIRED_METRICS if k.startswith("timing/"))
        assert record["loss/ptx"] > 0  # ptx_coef > 0: the pretraining LM loss is part of every step
        # vLLM's finish reasons reach the driver: every response stopped on the stop set or hit the length
        # limit (docs/ppo_details.md item 28, 29); reward.missing_eos_penalty is off, so none is penalised
        assert record["rollout/eos_rate"] + record["rollout/truncated_rate"] == pytest.approx(1.0)
        assert record["objective/penalised_responses"] == 0.0


def test_step0_sanity_kl_zero_and_ratio_one(ppo_run):
    """docs/ppo_details.md item 25: at step 0 policy == reference, so KL is 0; and the first minibatch of
    every iteration sees exactly the weights that computed the old log-probs, so ratio 1 and approx-KL 0."""
    first = ppo_run.records[0]
    assert abs(first["objective/kl"]) < 1e-6
    assert first["rollout/ref_logprob_diff"] < 1e-6
    for record in ppo_run.records:
        assert record["sanity/first_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert record["sanity/first_approx_kl"] < 1e-10
        assert record["sanity/first_max_abs_log_ratio"] < 1e-5
    assert ppo_run.records[-1]["rollout/ref_logprob_diff"] > 1e-3  # ...and training did move the policy


def test_vllm_logprobs_match_training_engine_after_sync(ppo_run):
    """docs/ppo_details.md item 26: from iteration 2 on vLLM samples with synced weights; its log-probs of the
    sampled tokens match the policy engine's. At iteration 2 the policy differs from the SFT weights vLLM
    started with by far more than that, so a sync that did not reach vLLM would show."""
    for record in ppo_run.records:
        assert record["rollout/vllm_logprob_diff_max"] < 1e-3, record["step"]
    second = ppo_run.records[1]
    assert second["rollout/ref_logprob_diff"] > 20 * second["rollout/vllm_logprob_diff"]


def test_adaptive_kl_controller_follows_the_rule(ppo_run):
    """docs/ppo_details.md item 13: beta_{t+1} = beta_t (1 + clip(KL_t / target - 1, +-0.2) n / horizon), n =
    32."""
    records = ppo_run.records
    assert records[0]["objective/kl_coef"] == pytest.approx(0.05)
    for prev, cur in zip(records, records[1:]):
        error = max(-0.2, min(0.2, prev["objective/kl"] / 1.0 - 1.0))
        assert cur["objective/kl_coef"] == pytest.approx(
            prev["objective/kl_coef"] * (1 + error * 32 / 200), rel=1e-9
        )


def test_reward_model_score_improves(ppo_run):
    scores = [r["objective/score"] for r in ppo_run.records]
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2, scores
    assert ppo_run.summary["ppo/score_last_quarter"] > ppo_run.summary["ppo/score_first_quarter"]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_every_trainable_parameter_of_policy_and_critic_changed(ppo_run, sft_model_dir, rm_model_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sft, policy = _safetensors(sft_model_dir), _safetensors(ppo_run.out / "model")
    assert set(policy) == set(sft)
    unchanged = [name for name in sft if torch.equal(sft[name], policy[name])]
    assert not unchanged, unchanged

    rm = _safetensors(rm_model_dir)
    critic_dir = ppo_run.out / "checkpoints" / f"iter_{ITERATIONS:06d}" / "critic"
    critic = get_fp32_state_dict_from_zero_checkpoint(str(critic_dir), tag="engine")
    assert set(critic) == set(rm)
    unchanged = [name for name in rm if torch.equal(rm[name], critic[name].to(rm[name].dtype))]
    assert not unchanged, unchanged


def test_outputs_of_the_run(ppo_run):
    out = ppo_run.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppo/iterations"] == ITERATIONS and summary["model_dir"] == str(out / "model")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000003", "iter_000006"]
    state = json.loads((out / "checkpoints" / "iter_000006" / "driver_state.json").read_text())
    assert state["iteration"] == ITERATIONS and state["prompt_position"] == ITERATIONS * 16
    assert state["ptx_position"] == ITERATIONS * 4 * 2 * 2  # 4 steps x 2 ranks x 2 rows per iteration
    assert any((out / "tensorboard").iterdir())
    assert (out / "config.yaml").is_file()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config.get("attention_dropout", 0.0) == 0.0


def test_final_policy_loads_with_transformers_and_vllm(ppo_run, ray_local):
    """OUT/model as is: transformers loads it, and a vLLM engine started from it gives the same
    log-probs for its samples as the transformers model (fp32, within 1e-3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout import RolloutEngine
    from trainers.algos import logprobs_from_logits

    model_dir = ppo_run.out / "model"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [
        template_ids(tok, text) for text in ("Write a short poem about rivers.", "List three colours.")
    ]
    engine = ray_local.remote(num_cpus=1)(RolloutEngine).remote(
        str(model_dir),
        seed=5,
        device="cpu",
        dtype="float32",
        kv_cache_memory_bytes=64 * 2**20,
        max_model_len=256,
    )
    try:
        samples = ray_local.get(
            engine.generate.remote(prompts, {"n": 1, "max_new_tokens": 16, "temperature": 1.0}, 7)
        )
    finally:
        ray_local.kill(engine)
    for prompt, sample in zip(prompts, samples):
        ids = torch.tensor([prompt + sample["token_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]  # (1, R, V)
        expected = logprobs_from_logits(logits, ids[:, len(prompt) :])[0]
        assert torch.allclose(expected, torch.tensor(sample["logprobs"]), atol=1e-3)


def test_resume_from_checkpoint_redoes_the_next_iteration_exactly(ppo_run, tmp_path):
    """Stop after iteration 3 (only its checkpoint kept, plus a half-written one from a crash), rerun:
    the run restores policy, critic, optimizer states, KL coefficient and data positions, and its
    iteration 4 equals the uninterrupted run's."""
    from trainers.ppo.driver import run_ppo
    from trainers.runs.metrics import read_metrics

    out = tmp_path / "run"
    shutil.copytree(ppo_run.out, out)
    shutil.rmtree(out / "checkpoints" / "iter_000006")
    (out / "checkpoints" / "iter_000006.tmp" / "policy").mkdir(parents=True)  # crashed mid-write
    summary = run_ppo(load_ppo_config(ppo_run.inputs, [*PPO_REFERENCE_OVERRIDES, "ppo.iterations=4"]), out)
    assert summary["ppo/resumed_from_iteration"] == 3 and summary["ppo/iterations"] == 4
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # steps 4-6 of the first run were cut
    redo, original = records[3], ppo_run.records[3]
    assert redo["objective/kl_coef"] == original["objective/kl_coef"]  # restored controller state
    # Same prompts, seeds and weights: everything but wall-clock times is reproduced (bit for bit on the
    # machine this was written on; a hair of slack is kept).
    assert redo["rollout/response_length"] == original["rollout/response_length"]
    for key in (k for k in original if not k.startswith("timing/")):
        assert redo[key] == pytest.approx(original[key], rel=1e-6, abs=1e-9), key
    state = json.loads((out / "checkpoints" / "iter_000004" / "driver_state.json").read_text())
    assert state["prompt_position"] == 4 * 16 and state["ptx_position"] == 4 * 16
    assert not (out / "checkpoints" / "iter_000006.tmp").exists()


def test_unsatisfiable_resources_exit_2_naming_the_role(world_dir, sft_model_dir, rm_model_dir, tmp_path):
    out = tmp_path / "never"
    env = subprocess_env()
    args = [
        sys.executable, "-m", "trainers.cli", "ppo", "--config", str(TINY_CONFIG), "--out", str(out),
        f"data.dir={world_dir}", f"model.path={sft_model_dir}", f"reward.path={rm_model_dir}",
        "cluster.num_cpus=8", "ppo.reward_workers=64",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(lines) == 1 and "'reward'" in lines[0] and "64" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written
