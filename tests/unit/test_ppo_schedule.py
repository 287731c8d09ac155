"""trainers/ppo/schedule.py: derived seeds, data positions, PPO epochs' minibatches, rank and ptx plans.

Expected seeds and permutations are written out by hand: a seed from the formula in ``derived_seed``'s
docstring, a permutation from ``torch.randperm`` with that seed (torch 2.13's generator).
"""

from __future__ import annotations

import pytest
import torch

from trainers.config import config_from_dict
from trainers.ppo import schedule

MOD = 2**31 - 1


def test_derived_seeds_follow_the_formula_and_differ_per_engine_and_iteration():
    # value = seed mod (2^31 - 1); then for each part: value = (value * 1_000_003 + part + 1) mod (2^31 - 1)
    assert schedule.derived_seed(0, 0) == 1
    assert schedule.derived_seed(3, 0) == 3_000_010  # 3 * 1_000_003 + 0 + 1
    assert schedule.derived_seed(3, 1) == 3_000_011
    assert schedule.derived_seed(0, 1, 2) == 2_000_009  # (0 + 2) * 1_000_003 + 3
    assert schedule.derived_seed(5, 2, 3) == 691_069_842  # (5_000_018 * 1_000_003 + 4) mod (2^31 - 1)
    assert schedule.derived_seed(MOD + 3, 0) == 3_000_010  # the seed is taken modulo 2^31 - 1 first
    seeds = {schedule.derived_seed(0, it, e) for it in range(10) for e in range(4)}
    assert len(seeds) == 40


def test_take_rows_crosses_passes_and_is_resumable():
    """5 rows, seed 3: pass 0 is randperm(5) seeded 3_000_010, pass 1 seeded 3_000_011."""
    pass0 = torch.randperm(5, generator=torch.Generator().manual_seed(3_000_010)).tolist()
    pass1 = torch.randperm(5, generator=torch.Generator().manual_seed(3_000_011)).tolist()
    assert (pass0, pass1) == ([1, 3, 0, 4, 2], [4, 1, 2, 0, 3])
    assert schedule.pass_order(5, 3, 0).tolist() == pass0
    assert schedule.pass_order(5, 3, 1).tolist() == pass1
    assert schedule.take_rows(0, 4, 5, 3) == [1, 3, 0, 4]
    assert schedule.take_rows(4, 4, 5, 3) == [2, 4, 1, 2]  # the end of pass 0, then pass 1
    assert schedule.take_rows(7, 3, 5, 3) == [2, 0, 3]
    with pytest.raises(ValueError, match="empty"):
        schedule.take_rows(0, 1, 0, 3)


def test_epoch_permutations_are_fresh_and_deterministic():
    """Iteration 1, seed 0: epoch e is randperm seeded derived_seed(0, 1, e, 7) = 705_724_672, 706_724_675."""
    perms = schedule.epoch_permutations(6, 2, seed=0, iteration=1)
    assert [p.tolist() for p in perms] == [[4, 0, 3, 1, 2, 5], [3, 2, 4, 0, 5, 1]]
    for perm, seed in zip(perms, (705_724_672, 706_724_675)):
        assert torch.equal(perm, torch.randperm(6, generator=torch.Generator().manual_seed(seed)))
    a = schedule.epoch_permutations(16, 3, seed=0, iteration=1)
    assert not torch.equal(a[0], a[1])  # reshuffled every epoch (docs/ppo_details.md item 21)
    assert not torch.equal(a[0], schedule.epoch_permutations(16, 1, seed=0, iteration=2)[0])
    assert all(sorted(p.tolist()) == list(range(16)) for p in a)


def test_minibatches_cut_each_epoch_in_order():
    perms = [torch.tensor([3, 1, 0, 2]), torch.tensor([2, 0, 3, 1])]
    steps = schedule.minibatches(perms, 2)
    assert [s.tolist() for s in steps] == [[3, 1], [0, 2], [2, 0], [3, 1]]
    with pytest.raises(ValueError, match="minibatches of 3"):
        schedule.minibatches(perms, 3)


def test_rank_micro_batches_cover_each_row_once_per_epoch_in_equal_micro_batches():
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
    # rank r takes the r-th contiguous half of each minibatch, cut into micro-batches in order
    small = schedule.rank_micro_batches([torch.tensor([7, 5, 3, 1])], world=2, micro_batch_size=1)
    assert [[m.tolist() for m in rank[0]] for rank in small] == [[[7], [5]], [[3], [1]]]


def test_rank_micro_batches_reject_uneven_split():
    with pytest.raises(ValueError):
        schedule.rank_micro_batches([torch.arange(6)], world=4, micro_batch_size=1)


def test_step_token_counts_are_global():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    assert schedule.step_token_counts(mask, [torch.tensor([0, 3]), torch.tensor([1, 2])]) == [2, 4]


def test_lm_label_count_skips_column_zero():
    labels = torch.tensor([[-100, 5, 6], [-100, -100, 7]])
    assert schedule.lm_label_count(labels) == 3
    assert schedule.lm_label_count(torch.tensor([[9, -100]])) == 0  # column 0 is never a target


def test_ptx_plan_same_slots_on_every_rank_and_global_token_count():
    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]  # world 2 x ptx_batch_size 2
    layout = schedule.ptx_plan(rows, world=2, micro_steps=3, pad_id=0)
    plan, tokens = layout.slots, layout.tokens
    assert [[s is None for s in r] for r in plan] == [[False, False, True], [False, False, True]]
    # each row predicts all its tokens but the first (collate_lm masks it): 2 + 1 + 3 + 1
    assert tokens == 7
    assert plan[1][0].input_ids.tolist() == [[6, 7, 8, 9]]
    assert plan[0][1].labels.tolist() == [[-100, 5]]
    with pytest.raises(ValueError, match="do not split over 3 ranks"):
        schedule.ptx_plan(rows, world=3, micro_steps=1, pad_id=0)


def _ppo(**over):
    base = {"mini_batch_size": 4, "micro_batch_size": 1, "policy_workers": 2, "critic_workers": 1}
    return config_from_dict({"ppo": {**base, "ppo_epochs": 2, "seed": 0, **over}}).ppo


def test_plan_training_lays_out_the_iteration_for_every_rank():
    """8 rows, minibatches of 4, 2 epochs: 4 optimizer steps; 2 policy ranks x 2 micro-batches of 1 row,
    1 critic rank x 4; ptx 1 row per policy rank per step."""
    mask = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0], [1, 1], [1, 1], [1, 0], [0, 0]])
    ptx_data = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11, 12]]
    plan = schedule.plan_training(_ppo(ptx_coef=0.5, ptx_batch_size=1), 3, mask, ptx_data, 5, pad_id=0)
    assert plan.first_step == 13  # iterations 0-2 took 12 steps
    assert len(plan.minibatches) == 4 and plan.ptx_rows == 4 * 2 * 1
    assert plan.step_tokens == [int(mask[rows].sum()) for rows in plan.minibatches]
    assert sum(plan.step_tokens) == 2 * int(mask.sum())  # every row once per epoch
    assert [len(p.steps) for p in plan.policy + plan.critic] == [4, 4, 4]
    assert all(p.first_step == 13 for p in plan.policy + plan.critic)
    for k, rows in enumerate(plan.minibatches):
        policy = [m for rank in plan.policy for m in rank.steps[k].micro_batches]
        critic = plan.critic[0].steps[k].micro_batches
        assert [len(m) for m in policy] == [1] * 4 and [len(m) for m in critic] == [1] * 4
        assert torch.equal(torch.cat(policy), rows) and torch.equal(torch.cat(critic), rows)
        assert {s.tokens for p in plan.policy + plan.critic for s in [p.steps[k]]} == {plan.step_tokens[k]}
        for rank in plan.policy:
            step = rank.steps[k]
            assert len(step.ptx) == 2 and step.ptx[1] is None  # 1 row over 2 micro-batches
            assert step.ptx_tokens == plan.ptx_tokens[k]
        assert plan.critic[0].steps[k].ptx is None
    # the pretraining rows continue the stream at position 5 (pass order of 4 rows, seed derived_seed(0, 1))
    taken = schedule.take_rows(5, 8, 4, schedule.derived_seed(0, 1))
    used = [rank.steps[k].ptx[0].input_ids[0].tolist() for k in range(4) for rank in plan.policy]
    assert used == [ptx_data[i] for i in taken]
    assert plan.ptx_tokens == [sum(len(ptx_data[i]) - 1 for i in taken[2 * k : 2 * k + 2]) for k in range(4)]


def test_plan_training_without_ptx():
    mask = torch.ones(8, 2, dtype=torch.long)
    plan = schedule.plan_training(_ppo(), 0, mask, [], 0, pad_id=0)
    assert plan.first_step == 1 and plan.ptx_tokens is None and plan.ptx_rows == 0
    assert all(s.ptx is None and s.ptx_tokens == 0 for p in plan.policy for s in p.steps)
    assert plan.step_tokens == [8, 8, 8, 8]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", None),  # each step's real tokens (checked against step_tokens below)
        ("seq_mean_token_mean", [4.0] * 4),  # the step's sequences
        ("token_sum_norm", [4.0 * 3] * 4),  # sequences x norm_length, whatever the lengths
    ],
)
def test_plan_training_denominators_follow_the_loss_aggregation(mode, expected):
    """docs/ppo_details.md item 24: every rank of a step divides by the same global denominator."""
    mask = torch.tensor(
        [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    )
    plan = schedule.plan_training(_ppo(loss_agg=mode), 0, mask, [], 0, pad_id=0, norm_length=3)
    if expected is None:
        expected = [float(t) for t in plan.step_tokens]
        assert expected != [expected[0]] * 4  # the lengths differ per step: the test can tell modes apart
    assert plan.denominators == expected
    for rank in plan.policy:
        assert [s.denominator for s in rank.steps] == expected
    assert [s.tokens for s in plan.policy[0].steps] == plan.step_tokens  # token stats stay token counts


def test_token_sum_norm_needs_the_response_length_constant():
    with pytest.raises(ValueError, match="norm_length >= 1"):
        schedule.plan_training(_ppo(loss_agg="token_sum_norm"), 0, torch.ones(8, 2), [], 0, pad_id=0)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_plan_training_without_a_critic_plans_no_critic_ranks(estimator):
    p = _ppo(advantage=estimator, samples_per_prompt=2)
    plan = schedule.plan_training(p, 0, torch.ones(8, 2, dtype=torch.long), [], 0, pad_id=0)
    assert plan.critic == []
    assert len(plan.policy) == 2 and all(len(r.steps) == 4 for r in plan.policy)
    assert len(schedule.plan_training(_ppo(), 0, torch.ones(8, 2), [], 0, pad_id=0).critic) == 1


def test_plan_training_by_tokens_gives_every_rank_as_many_micro_batches_with_a_ptx_slot_each():
    """``ppo.micro_batch_tokens``: each step's rank parts packed by length, the same count on every policy
    rank (the critic's own), one ptx slot per policy micro-batch, every row once, token counts unchanged."""
    g = torch.Generator().manual_seed(3)
    n = 16
    prompt = torch.randint(1, 6, (n,), generator=g).tolist()
    response = torch.randint(1, 12, (n,), generator=g).tolist()
    response[5] = 40  # one row over the budget alone
    mask = torch.tensor([[1] * r + [0] * (40 - r) for r in response])  # (16, 40)
    lengths = list(zip(prompt, response))
    ptx_data = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11, 12]]
    over = {"mini_batch_size": 8, "micro_batch_tokens": 30, "ptx_coef": 0.5, "ptx_batch_size": 2}
    p = _ppo(**over)
    plan = schedule.plan_training(p, 0, mask, ptx_data, 0, pad_id=0, lengths=lengths)
    fixed = schedule.plan_training(_ppo(**over | {"micro_batch_tokens": 0}), 0, mask, ptx_data, 0, pad_id=0)
    assert plan.step_tokens == fixed.step_tokens and plan.denominators == fixed.denominators
    counts = []
    for k, rows in enumerate(plan.minibatches):
        for ranks in (plan.policy, plan.critic):
            micros = [rank.steps[k].micro_batches for rank in ranks]
            assert len({len(m) for m in micros}) == 1  # equal counts over the ranks of a role
            assert all(len(m) for mb in micros for m in mb)  # none empty
            assert sorted(torch.cat([m for mb in micros for m in mb]).tolist()) == sorted(rows.tolist())
        # each rank keeps today's contiguous part of the minibatch
        for rank, part in enumerate(rows.chunk(2)):
            got = torch.cat(plan.policy[rank].steps[k].micro_batches)
            assert sorted(got.tolist()) == sorted(part.tolist())
        counts.append(len(plan.policy[0].steps[k].micro_batches))
        for rank in plan.policy:
            assert len(rank.steps[k].ptx) == counts[-1]  # one slot per micro-batch
            assert rank.steps[k].ptx_tokens == fixed.policy[0].steps[k].ptx_tokens
    assert counts != [4] * len(counts)  # not the fixed layout of 1-row micro-batches
    five = [m for r in plan.policy for s in r.steps for m in s.micro_batches if 5 in m.tolist()]
    assert all(m.tolist() == [5] for m in five)  # 5 + 40 > 30 tokens: alone


def test_token_micro_batches_need_the_lengths():
    with pytest.raises(ValueError, match="lengths"):
        schedule.rank_micro_batches([torch.arange(4)], world=2, micro_batch_size=1, micro_batch_tokens=8)


def test_padding_metrics_count_the_slots_each_layout_computes():
    """Fixed micro-batches compute the batch's whole width P+R; trimmed ones rows x (longest prompt +
    longest response)."""
    from trainers.ppo.batch import build_rollout_batch

    tokens = build_rollout_batch([[5], [5, 6, 7]], [[8, 2], [8, 8, 8, 2]], 0, (2,)).tokens  # P=3, R=4
    plan = [schedule.RankPlan(1, [schedule.StepPlan([torch.tensor([0]), torch.tensor([1])], tokens=6)])]
    fixed = schedule.padding_metrics(plan, tokens, trimmed=False)
    assert fixed == {"padding_fraction": pytest.approx(1 - 10 / 14), "micro_batches": 2.0}  # 3 + 7 real
    assert schedule.padding_metrics(plan, tokens, trimmed=True)["padding_fraction"] == 0.0
