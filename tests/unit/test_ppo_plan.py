"""Minibatch and ptx plans, experience maths wiring, metric reduction, checkpoint directories."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import algos
from trainers.ppo import batch, checkpoint, experience, metrics, schedule


def test_epoch_permutations_are_fresh_and_deterministic():
    a = schedule.epoch_permutations(16, 3, seed=0, iteration=1)
    b = schedule.epoch_permutations(16, 3, seed=0, iteration=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # reshuffled every epoch (PPO_DETAILS 21)
    assert not torch.equal(a[0], schedule.epoch_permutations(16, 1, seed=0, iteration=2)[0])
    assert all(sorted(p.tolist()) == list(range(16)) for p in a)


def test_rank_plan_covers_each_row_once_per_epoch_in_equal_micro_batches():
    perms = schedule.epoch_permutations(16, 2, seed=0, iteration=0)
    steps = schedule.minibatches(perms, 8)
    assert len(steps) == 4  # 2 epochs x 16/8 optimizer steps
    plan = schedule.rank_micro_batches(steps, world=2, micro_batch_size=2)
    assert len(plan) == 2 and all(len(p) == 4 for p in plan)
    for step, rows in enumerate(steps):
        micro = [m for rank in plan for m in rank[step]]
        assert all(len(m) == 2 for m in micro) and len(micro) == 4
        assert sorted(torch.cat(micro).tolist()) == sorted(rows.tolist())
    epoch0 = torch.cat([m for rank in plan for step in rank[:2] for m in step])
    assert sorted(epoch0.tolist()) == list(range(16))


def test_rank_plan_rejects_uneven_split():
    with pytest.raises(ValueError):
        schedule.rank_micro_batches([torch.arange(6)], world=4, micro_batch_size=1)


def test_step_token_counts_are_global():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    assert schedule.step_token_counts(mask, [torch.tensor([0, 3]), torch.tensor([1, 2])]) == [2, 4]


def test_ptx_plan_same_slots_on_every_rank_and_global_token_count():
    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]  # world 2 x ptx_batch_size 2
    layout = schedule.ptx_plan(rows, world=2, micro_steps=3, pad_id=0)
    plan, tokens = layout.slots, layout.tokens
    assert [[s is None for s in r] for r in plan] == [[False, False, True], [False, False, True]]
    # each row predicts all its tokens but the first (collate_lm masks it): 2 + 1 + 3 + 1
    assert tokens == 7
    assert plan[1][0].input_ids.tolist() == [[6, 7, 8, 9]]
    assert plan[0][1].labels.tolist() == [[-100, 5]]


def test_compute_advantages_hand_example():
    # One sequence, 2 real tokens then padding. kl_coef 0.5, gamma 1, lam 1.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    old = torch.tensor([[-1.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.1, 9.0], [0.3, 9.0, 9.0]])
    scores = torch.tensor([1.0, -1.0])
    exp = experience.compute_advantages(
        mask, experience.ExperiencePasses(old, ref, scores, values), kl_coef=0.5, gamma=1.0, lam=1.0
    )
    assert exp.kl.tolist() == [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert exp.rewards.tolist() == [[-0.25, 1.0, 0.0], [-1.0, 0.0, 0.0]]
    # gamma = lam = 1: returns = reward-to-go; advantages = returns - values (before whitening)
    assert torch.allclose(exp.returns, torch.tensor([[0.75, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    raw_adv = torch.tensor([[0.55, 0.9, 0.0], [-1.3, 0.0, 0.0]])
    assert torch.allclose(exp.advantages, algos.masked_whiten(raw_adv, mask), atol=1e-6)
    assert exp.values[0, 2] == 0 and exp.values[1, 1] == 0  # zero past the end (item 12)


def test_compute_advantages_score_clip():
    mask = torch.ones(2, 1)
    zeros = torch.zeros(2, 1)
    passes = experience.ExperiencePasses(zeros, zeros, torch.tensor([5.0, -0.5]), zeros)
    exp = experience.compute_advantages(mask, passes, 0.1, score_clip=1.0)
    assert exp.scores.tolist() == [1.0, -0.5]


def test_rollout_metrics():
    rollout = batch.build_rollout_batch(
        [[5], [5]], [[6, 2], [6, 7, 8]], pad_id=0, eos_id=2, vllm_logprobs=[[-1.0, -1.0], [-1.0, -1.0, -1.0]]
    )
    old = torch.tensor([[-1.0, -1.5, 0.0], [-1.0, -1.0, -0.9]])
    m = metrics.rollout_metrics(rollout, eos_id=2, old_logprobs=old, ref_logprobs=old - 0.25)
    assert m["rollout/response_length"] == 2.5
    assert m["rollout/eos_rate"] == 0.5
    assert m["rollout/vllm_logprob_diff"] == pytest.approx(0.6 / 5)
    assert m["rollout/vllm_logprob_diff_max"] == pytest.approx(0.5)
    assert m["rollout/ref_logprob_diff"] == pytest.approx(0.25)


def test_objective_metrics_match_definitions():
    mask = torch.tensor([[1, 1], [1, 0]])
    passes = experience.ExperiencePasses(
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


def test_checkpoint_rotation_keeps_newest_complete(tmp_path):
    for it in (2, 4, 10):
        (tmp_path / checkpoint.checkpoint_name(it)).mkdir()
    (tmp_path / "iter_000012.tmp").mkdir()  # an interrupted write: never complete
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "iter_000002",
        "iter_000004",
        "iter_000010",
    ]
    checkpoint.rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000004", "iter_000010"]
    assert checkpoint.complete_checkpoints(tmp_path / "missing") == []


def test_resume_with_another_run_shape_is_a_config_error(tmp_path):
    import dataclasses
    import json

    from trainers.config import config_from_dict
    from trainers.errors import ConfigError

    cfg = config_from_dict({})
    ckpt = tmp_path / checkpoint.checkpoint_name(3)
    ckpt.mkdir()
    state = checkpoint.DriverState(iteration=3, shape=checkpoint.run_shape(cfg))
    (ckpt / checkpoint.DRIVER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    checkpoint.check_resumable(ckpt, cfg)  # same shape: fine
    checkpoint.check_resumable(None, cfg)  # nothing to resume: fine
    cfg.ppo.adaptive_kl = True
    with pytest.raises(ConfigError, match="kl_controller=fixed"):
        checkpoint.check_resumable(ckpt, cfg)
