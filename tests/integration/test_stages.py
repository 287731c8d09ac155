"""Stages 0-2 on real Ray Train + DeepSpeed ZeRO-3 (gloo, fp32, CPU) with the tiny preset.

The session fixtures (conftest.py) train base -> SFT -> RM once with 2 workers; these tests check
what they produced, then run SFT again with 1 worker (through an injected crash that Ray Train
recovers from, then a second invocation that continues the run) to check data-parallel invariance
and exact resume against the 2-worker run.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cluster.faults import FAIL_AFTER_ENV
from tests.integration.conftest import run_stage_for_test
from trainers.runs.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER_TOLERANCE = 1e-4
"""Relative tolerance of 1-worker vs 2-worker losses and gradient norms (fp32; only the summation
order of the gradient reduction differs, measured differences are ~1e-6)."""


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run.out / "metrics.jsonl")}


def test_pretrain_loss_falls_and_the_model_loads(base_run):
    records = read_metrics(base_run.out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(records) + 1))  # log_every=1: one record per step, no repeats
    first, last = records[0]["loss"], base_run.summary["pretrain/train_loss"]
    assert first > math.log(1000) - 1  # near-uniform over a ~1k vocabulary at the start
    assert last < 0.5 * first
    assert base_run.summary["pretrain/valid_loss"] < 0.5 * first
    assert all(r["tokens_per_s"] > 0 for r in records)
    model = AutoModelForCausalLM.from_pretrained(base_run.model_dir, use_safetensors=True)
    assert model.config.attention_dropout == 0.0 and model.config.use_cache is True
    assert list((base_run.out / "tensorboard").glob("events.out.tfevents.*"))
    assert (base_run.out / "summary.json").is_file() and (base_run.out / "config.yaml").is_file()


def _response_nll(model, examples, backward_scale: float | None = None) -> tuple[float, int]:
    """``(summed NLL of the target tokens, their count)`` of ``(ids, n_prompt)`` examples under a plain
    transformers causal LM, written out with torch alone: each example is forwarded on its own, unpadded
    (positions 0..T-1), and token ``t >= n_prompt`` is predicted by the logits at ``t - 1`` -- none of the
    stages' collation, label masking, loss or normaliser is involved. With ``backward_scale``, each
    example's NLL times it is back-propagated (gradients accumulate in ``model``)."""
    total, count = 0.0, 0
    for ids, n_prompt in examples:
        tokens = torch.tensor([ids])  # (1, T)
        logits = model(input_ids=tokens).logits[0, n_prompt - 1 : -1]  # (T - n_prompt, V)
        targets = tokens[0, n_prompt:]  # (T - n_prompt,)
        nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
        if backward_scale is not None:
            (nll * backward_scale).backward()
        total, count = total + nll.item(), count + len(targets)
    return total, count


def _chat_format(cfg):
    """The run's tokenizer and chat format, as the stage's driver builds them."""
    from trainers.config import tokenizer_dir
    from trainers.data.tokenizer import load_tokenizer
    from trainers.stages.sft import chat_format

    tokenizer = load_tokenizer(tokenizer_dir(cfg), cfg.model.chat_template)
    return tokenizer, chat_format(cfg, tokenizer)


def _demonstrations(cfg, split: str) -> list:
    """``demonstrations/<split>`` as the SFT stage tokenizes it: ``(ids, n_prompt)`` pairs."""
    from trainers.stages.sft import read_demonstrations

    return read_demonstrations(cfg, _chat_format(cfg)[1], split)[0]


def test_sft_changes_every_parameter_and_lowers_the_loss(base_run, sft_run):
    before = load_file(base_run.model_dir / "model.safetensors")
    after = load_file(sft_run.model_dir / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    records = read_metrics(sft_run.out / "metrics.jsonl")
    assert sft_run.summary["sft/train_loss"] < records[0]["loss"] - 0.3
    assert sft_run.summary["sft/valid_loss"] < records[0]["loss"] - 0.3
    # The exported model is the trained one: plain transformers loads every tensor (nothing left at its
    # initialisation), and its validation loss is the one the workers measured after the last step.
    model, info = AutoModelForCausalLM.from_pretrained(
        sft_run.model_dir, use_safetensors=True, output_loading_info=True
    )
    assert {key: value for key, value in info.items() if value} == {}
    assert model.config.use_cache is True and model.config.attention_dropout == 0.0
    cfg = sft_run.cfg
    valid = _demonstrations(cfg, "valid")
    with torch.no_grad():
        nll, count = _response_nll(model.eval(), valid)
    assert nll / count == pytest.approx(sft_run.summary["sft/valid_loss"], rel=WORKER_TOLERANCE)


def test_first_step_is_the_global_token_mean(base_run, sft_run):
    """Step 1 of the 2-worker run equals an independent single-process computation (docs/ppo_details.md item
    24): the base model loaded with plain transformers, the step's global batch taken in epoch 0's seeded
    order, the token mean of the response tokens' cross-entropy over the whole batch and the norm of its
    gradient (pre-clip), all written out here (:func:`_response_nll`). A bug in the stages' collation, label
    masking, loss normalisation or sharding makes the numbers differ."""
    import random

    cfg = sft_run.cfg
    train = _demonstrations(cfg, "train")  # (prompt + response ids, prompt length)
    order = list(range(len(train)))
    random.Random(f"{cfg.sft.seed}:epoch:0").shuffle(order)  # epoch 0; step 1 takes its first G examples
    batch = [train[i] for i in order[: cfg.sft.global_batch_size]]
    n_targets = sum(len(ids) - n_prompt for ids, n_prompt in batch)
    model = AutoModelForCausalLM.from_pretrained(base_run.model_dir, use_safetensors=True)
    model.train()  # dropout is 0 in tiny.yaml, so train mode is deterministic
    nll, count = _response_nll(model, batch, backward_scale=1.0 / n_targets)
    assert count == n_targets
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    step1 = read_metrics(sft_run.out / "metrics.jsonl")[0]
    assert step1["loss"] == pytest.approx(nll / n_targets, rel=WORKER_TOLERANCE)
    assert step1["grad_norm"] == pytest.approx(grad_norm, rel=1e-3)
    assert step1["target_tokens"] == n_targets


def _assert_same_steps(records: list[dict], reference: dict[int, dict]) -> None:
    for r in records:
        ref = reference[r["step"]]
        assert r["loss"] == pytest.approx(ref["loss"], rel=WORKER_TOLERANCE), r["step"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=WORKER_TOLERANCE), r["step"]
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-9), r["step"]
        assert r["target_tokens"] == ref["target_tokens"]


def test_one_worker_matches_two_through_a_crash_and_a_continuation(
    sft_run, base_run, world_dir, tmp_path, monkeypatch
):
    """SFT with 1 worker (2 accumulation steps) against the fixture's 2 workers, on the same data.

    First invocation: every worker raises after step 3 (``RLHF_FAULT_FAIL_AFTER_STEP``); Ray Train
    (max_failures=1) restarts the worker group, which resumes from the step-2 checkpoint and stops at
    max_steps=4. Second invocation of the same command with max_steps=6 continues from the step-4
    checkpoint. Every step must equal the uninterrupted 2-worker run's step.
    """
    out = tmp_path / "sft_one_worker"
    one = ["sft.num_workers=1", "sft.checkpoint_every=2"]
    monkeypatch.setenv(FAIL_AFTER_ENV, "sft:3")
    first = run_stage_for_test(
        "sft", out, world_dir, base_run.model_dir, extra=[*one, "sft.max_steps=4"], max_failures=1
    )
    assert first.summary["sft/resumed_from_step"] == 2 and first.summary["sft/steps"] == 4
    monkeypatch.delenv(FAIL_AFTER_ENV)
    second = run_stage_for_test("sft", out, world_dir, base_run.model_dir, extra=[*one, "sft.max_steps=6"])
    assert second.summary["sft/resumed_from_step"] == 4 and second.summary["sft/steps"] == 6
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # resumed, not restarted; no step twice
    _assert_same_steps(records, {r["step"]: r for r in read_metrics(sft_run.out / "metrics.jsonl")})


def _mean_score(model, sequences, pad_id, batch_size=64) -> float:
    from trainers.data.collate import left_pad
    from trainers.runtime.models import reward_scores

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            ids, mask = left_pad(sequences[i : i + batch_size], pad_id)
            total += float(reward_scores(model, ids, mask).sum())
    return total / len(sequences)


def test_reward_model_ranks_held_out_comparisons_and_is_normalised(rm_run, sft_run):
    """Accuracy >= 0.75 on comparisons/valid, recomputed here with plain transformers from the saved
    model; the demonstrations' mean score is 0 after normalisation (reward_bias in config.json)."""
    from trainers.algos import ranking_loss
    from trainers.stages.rm import (
        NORMALIZE_MAX_DEMOS,
        RMTask,
        normalization_demos,
        pair_counts,
        read_comparisons,
    )

    cfg = rm_run.cfg
    summary = rm_run.summary
    assert summary["rm/valid_accuracy"] >= 0.75
    model = AutoModelForSequenceClassification.from_pretrained(rm_run.model_dir, use_safetensors=True).eval()
    assert model.config.reward_bias == pytest.approx(summary["rm/reward_bias"])
    tokenizer, fmt = _chat_format(cfg)
    task = RMTask(cfg.model, cfg.rm, tokenizer)
    valid = read_comparisons(cfg, fmt, "valid")[0]
    correct = pairs = 0.0
    with torch.no_grad():
        for i in range(0, len(valid), 8):
            batch = task.collate(valid[i : i + 8])
            _, accuracy = ranking_loss(task._scores(model, batch), batch["ranks"])
            batch_pairs = float(pair_counts(batch["ranks"]).sum())
            correct, pairs = correct + float(accuracy) * batch_pairs, pairs + batch_pairs
    assert correct / pairs == pytest.approx(summary["rm/valid_accuracy"], abs=1e-3)
    demos = normalization_demos(cfg, fmt, "train", NORMALIZE_MAX_DEMOS)
    assert abs(_mean_score(model, demos, tokenizer.pad_token_id)) < 0.05
    assert abs(summary["rm/demo_mean_score_after"]) < 0.05
    sft = load_file(sft_run.model_dir / "model.safetensors")
    rm = load_file(rm_run.model_dir / "model.safetensors")
    trunk = [k for k in sft if k in rm]
    assert trunk and all(not torch.equal(sft[k], rm[k]) for k in trunk)  # the whole trunk was trained
    assert "score.weight" in rm and "lm_head.weight" not in rm
