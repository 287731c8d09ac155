"""trainers/ppo/metrics.py: what an iteration logs, from the rollout, the advantages and the ranks' stat sums
(non-finite steps included), and the run's summary."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainers.ppo import batch, experience, metrics
from trainers.ppo.experience import ExperiencePasses


def test_rollout_metrics():
    rollout = batch.build_rollout_batch(
        [[5], [5]],
        [[6, 2], [6, 7, 8]],
        pad_id=0,
        stop_ids=(2,),
        vllm_logprobs=[[-1.0, -1.0], [-1.0, -1.0, -1.0]],
    )
    old = torch.tensor([[-1.0, -1.5, 0.0], [-1.0, -1.0, -0.9]])
    m = metrics.rollout_metrics(rollout, stop_ids=(2,), old_logprobs=old, ref_logprobs=old - 0.25)
    assert m["rollout/response_length"] == 2.5
    assert m["rollout/eos_rate"] == 0.5
    assert "rollout/truncated_rate" not in m  # no finish reasons in this rollout
    assert m["rollout/vllm_logprob_diff"] == pytest.approx(0.6 / 5)
    assert m["rollout/vllm_logprob_diff_max"] == pytest.approx(0.5)
    assert m["rollout/ref_logprob_diff"] == pytest.approx(0.25)


def test_eos_rate_counts_every_stop_id_and_truncated_rate_the_length_stops():
    """docs/ppo_details.md item 28, 29: a response ending on any stop id counts as stopped; PAD == EOS
    changes nothing (the last token is found from the mask)."""
    stops = (2, 9)
    responses = [[6, 2], [6, 9], [6, 7, 8], [7, 7], [9]]
    reasons = ["stop", "stop", "length", "length", "stop"]
    rollout = batch.build_rollout_batch(
        [[5]] * 5, responses, pad_id=2, stop_ids=stops, finish_reasons=reasons
    )
    m = metrics.rollout_metrics(rollout, stops)
    assert m["rollout/eos_rate"] == pytest.approx(3 / 5)
    assert m["rollout/truncated_rate"] == pytest.approx(2 / 5)
    assert metrics.rollout_metrics(rollout, (2,))["rollout/eos_rate"] == pytest.approx(1 / 5)


def test_objective_metrics_log_the_raw_score_and_the_penalised_count():
    mask = torch.ones(3, 1)
    zeros = torch.zeros(3, 1)
    raw = torch.tensor([1.0, 2.0, 3.0])
    exp = experience.compute_advantages(
        mask,
        ExperiencePasses(zeros, zeros, raw, zeros),
        kl_coef=0.1,
        truncated=torch.tensor([True, False, True]),
        missing_eos_penalty=1.0,
    )
    m = metrics.objective_metrics(exp, raw, mask, 0.1)
    assert m["objective/score"] == 2.0  # raw, before the penalty
    assert m["objective/score_used"] == pytest.approx((0.0 + 2.0 + 2.0) / 3)
    assert m["objective/penalised_responses"] == 2.0


def test_objective_metrics_match_definitions():
    mask = torch.tensor([[1, 1], [1, 0]])
    passes = ExperiencePasses(
        torch.tensor([[0.0, -1.0], [-1.0, 0.0]]),
        torch.tensor([[-1.0, -1.0], [-2.0, 0.0]]),
        torch.tensor([2.0, 0.0]),
        torch.zeros(2, 2),
    )
    exp = experience.compute_advantages(mask, passes, kl_coef=0.1)
    m = metrics.objective_metrics(exp, torch.tensor([2.0, 0.0]), mask, 0.1)
    assert m["objective/kl"] == pytest.approx(1.0)  # per-sequence sums 1 and 1
    assert m["objective/non_score_reward"] == pytest.approx(-0.1)
    assert m["objective/score"] == 1.0
    assert m["objective/reward_total"] == pytest.approx(1.0 - 0.1)


def _step(tokens, loss, ratio, **extra):
    stats = {
        "tokens": tokens,
        "loss_sum": loss * tokens,
        "clip_sum": 0.0,
        "approx_kl_sum": 0.0,
        "entropy_sum": tokens * 2.0,
        "ratio_sum": ratio * tokens,
        "ratio_sq_sum": ratio * ratio * tokens,
        "max_abs_log_ratio": abs(math.log(ratio)),
        "max_grad_norm": 1.0,
    }
    stats.update(extra)
    return stats


def test_sum_over_ranks_and_policy_metrics():
    rank0 = [_step(2, 1.0, 1.0), _step(2, 3.0, 1.5, ptx_sum=4.0)]
    rank1 = [_step(6, 1.0, 1.0), _step(2, 3.0, 0.5, ptx_sum=2.0)]
    steps = metrics.sum_over_ranks([rank0, rank1])
    assert steps[0]["tokens"] == 8 and steps[1]["max_abs_log_ratio"] == pytest.approx(math.log(2))
    m = metrics.policy_metrics(steps, ptx_tokens=[0, 4])
    assert m["loss/policy"] == pytest.approx((8 * 1.0 + 4 * 3.0) / 12)
    assert m["policy/ratio_mean"] == pytest.approx(1.0)
    # ratios: 8 tokens at 1, 2 at 1.5, 2 at 0.5 -> var = (2*0.25 + 2*0.25) / 12
    assert m["policy/ratio_std"] == pytest.approx(math.sqrt(1.0 / 12))
    assert m["loss/ptx"] == pytest.approx(6.0 / 4)
    assert m["policy/entropy"] == pytest.approx(2.0)
    assert m["sanity/first_ratio_mean"] == 1.0 and m["sanity/first_max_abs_log_ratio"] == 0.0


def test_critic_metrics_token_mean():
    m = metrics.critic_metrics(
        [{"tokens": 2, "loss_sum": 1.0, "clip_sum": 1.0}, {"tokens": 6, "loss_sum": 3.0, "clip_sum": 0.0}]
    )
    assert m == {"loss/value": 0.5, "value/clipfrac": 1.0 / 8, "value/skipped_steps": 0.0}


def _stats(tokens, loss, skipped=0.0, grad=1.0, ptx=0.0):
    return {
        "tokens": tokens,
        "loss_sum": loss * tokens,
        "clip_sum": 0.0,
        "approx_kl_sum": 0.0,
        "entropy_sum": tokens,
        "ratio_sum": tokens,
        "ratio_sq_sum": tokens,
        "max_abs_log_ratio": 0.0,
        "max_grad_norm": grad,
        "ptx_sum": ptx,
        "skipped": skipped,
    }


def test_skipped_steps_are_counted_and_left_out_of_the_means():
    nan = math.nan
    rank0 = [_stats(2, 1.0, ptx=2.0), _stats(2, nan, 1.0, math.inf, nan), _stats(2, 3.0, ptx=6.0)]
    rank1 = [_stats(2, 1.0, ptx=2.0), _stats(2, 1.0, 1.0, math.inf, 1.0), _stats(2, 3.0, ptx=6.0)]
    steps = metrics.sum_over_ranks([rank0, rank1])
    assert [s["skipped"] for s in steps] == [0.0, 1.0, 0.0]  # a flag, not summed over ranks
    m = metrics.policy_metrics(steps, ptx_tokens=[4, 4, 8])
    assert m["policy/skipped_steps"] == 1.0
    assert m["loss/policy"] == pytest.approx((4 * 1.0 + 4 * 3.0) / 8)
    assert m["policy/grad_norm"] == 1.0
    assert m["loss/ptx"] == pytest.approx((4.0 + 12.0) / 12)
    assert all(math.isfinite(v) for v in m.values())
    c = metrics.critic_metrics(steps)
    assert c["value/skipped_steps"] == 1.0 and c["loss/value"] == pytest.approx(2.0)


def test_an_iteration_with_every_step_skipped_reports_nan_not_zero():
    steps = [_stats(4, math.nan, 1.0, math.inf)]
    m = metrics.policy_metrics(steps, ptx_tokens=[3])
    assert m["policy/skipped_steps"] == 1.0
    assert math.isnan(m["loss/policy"]) and math.isnan(m["policy/grad_norm"]) and math.isnan(m["loss/ptx"])
    assert math.isnan(metrics.critic_metrics(steps)["loss/value"])


def test_iteration_line_and_summary():
    m = {
        "objective/score": 0.5,
        "objective/kl": 1.25,
        "loss/policy": -0.01,
        "timing/generate": 1.0,
        "timing/train": 2.5,
    }
    assert metrics.iteration_line(2, 6, m) == "ppo iter 2/6 score 0.5 kl 1.25 policy -0.01 (3.5s)"
    records = [{"step": i + 1, "objective/score": float(s)} for i, s in enumerate([1, 2, 3, 4, 5, 6, 7, 8])]
    s = metrics.summarize(records, iterations=8, wall=12.345, out=Path("/o"), resumed_from=3)
    assert s["ppo/objective/score"] == 8.0 and "ppo/step" not in s
    assert s["ppo/score_first_quarter"] == 1.5 and s["ppo/score_last_quarter"] == 7.5  # quarters of 2
    assert (s["ppo/iterations"], s["ppo/resumed_from_iteration"], s["ppo/wall_time_s"]) == (8, 3, 12.35)
    assert s["model_dir"] == "/o/model"
    assert metrics.summarize([], 0, 1.0, Path("/o"), 0)["ppo/iterations"] == 0


def test_policy_loss_divides_by_the_aggregation_denominators_and_kl_loss_only_when_on():
    """Two steps of 6 and 2 tokens; seq_mean_token_mean's denominators are their sequence counts (3, 1).
    The token stats (entropy, ratio) stay token means."""
    steps = [_step(6, 1.0, 1.0, kl_loss_sum=0.6), _step(2, 3.0, 1.0, kl_loss_sum=0.2)]
    m = metrics.policy_metrics(steps, denominators=[3.0, 1.0])
    assert m["loss/policy"] == pytest.approx((6 * 1.0 + 2 * 3.0) / (3 + 1))
    assert m["loss/kl"] == pytest.approx(0.8 / 4)
    assert m["policy/entropy"] == pytest.approx(2.0)  # (12 + 4) / 8 tokens
    default = metrics.policy_metrics(steps)  # no denominators: the tokens
    assert default["loss/policy"] == pytest.approx(12.0 / 8) and default["loss/kl"] == pytest.approx(0.1)
    assert "loss/kl" not in metrics.policy_metrics([_step(6, 1.0, 1.0)], denominators=[3.0])


def test_a_skipped_step_leaves_its_denominator_out():
    steps = [_stats(4, 1.0), _stats(4, math.nan, skipped=1.0, grad=math.inf), _stats(2, 2.0)]
    m = metrics.policy_metrics(steps, denominators=[8.0, 8.0, 8.0])
    assert m["loss/policy"] == pytest.approx((4.0 + 4.0) / 16)


def test_objective_metrics_without_a_critic_have_no_value_metrics_and_log_each_source():
    mask = torch.tensor([[1, 1], [1, 0]])
    zeros = torch.zeros(2, 2)
    scores = torch.tensor([1.5, 0.5])
    sources = {"rm": torch.tensor([2.0, 0.0]), "function": torch.tensor([1.0, 0.0])}
    grpo = experience.compute_advantages(
        mask, ExperiencePasses(zeros, zeros, scores, zeros), 0.1, estimator="grpo", group_size=2
    )
    m = metrics.objective_metrics(grpo, scores, mask, 0.1, sources)
    assert not [k for k in m if k.startswith("value/")]  # absent, not zero
    assert (m["reward/rm"], m["reward/function"]) == (1.0, 0.5)  # each source before weighting
    assert m["objective/score"] == 1.0
    assert "reward/url" not in m
    gae = experience.compute_advantages(mask, ExperiencePasses(zeros, zeros, scores, zeros + 0.25), 0.1)
    with_critic = metrics.objective_metrics(gae, scores, mask, 0.1)
    assert with_critic["value/mean"] == pytest.approx(0.25)
    assert "value/returns_mean" in with_critic and not [k for k in with_critic if k.startswith("reward/")]
