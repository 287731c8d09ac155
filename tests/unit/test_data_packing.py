"""Micro-batches by a token budget (trainers/data/packing.py; docs/design.md, "Token-budget micro-batches
(issue 17)"): the budget holds, rows are grouped by length, and every rank gets as many micro-batches."""

from __future__ import annotations

import random

import pytest

from trainers.data.packing import equal_packs, pack, padded_size, split_to


def test_padded_size_is_rows_times_the_longest_of_each_segment():
    assert padded_size([(3, 1), (1, 4)]) == 2 * (3 + 4)
    assert padded_size([(5,), (2,), (7,)]) == 3 * 7
    assert padded_size([]) == 0


def test_pack_groups_by_length_within_the_budget_and_a_long_row_alone():
    lengths = [(2, 2), (10, 10), (1, 1), (2, 1), (30, 30), (1, 2)]
    groups = pack(lengths, budget=12)
    # sorted by total length (ties by index), filled greedily: rows 2, 3, 5 take 3 x (2 + 2) = 12 tokens
    assert groups == [[2, 3, 5], [0], [1], [4]]
    assert padded_size([lengths[4]]) == 60  # over the budget: alone


def test_pack_needs_a_positive_budget():
    with pytest.raises(ValueError, match="positive"):
        pack([(1, 1)], budget=0)


def test_split_to_halves_the_most_padded_micro_batch():
    lengths = [(1, 1)] * 4 + [(5, 5)] * 2
    assert split_to([[0, 1, 2, 3], [4, 5]], 3, lengths) == [[0, 1, 2, 3], [4], [5]]  # 20 > 8 tokens
    assert split_to([[0, 1, 2]], 3, lengths) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="cannot split"):
        split_to([[0], [1]], 3, lengths)


def _check(per_rank, budget, packs):
    counts = {len(p) for p in packs}
    assert len(counts) == 1  # the same number of micro-batches on every rank
    assert counts.pop() == max(len(pack(lengths, budget)) for lengths in per_rank)
    for lengths, groups in zip(per_rank, packs):
        assert all(groups)  # none empty
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each row once
        for g in groups:  # within the budget unless one row alone is over it
            assert len(g) == 1 or padded_size([lengths[i] for i in g]) <= budget


def test_equal_packs_property_over_random_lengths_budgets_and_worlds():
    """300 random cases: 1-8 ranks of 1-24 rows, uniform or heavy-tailed responses, budgets from 1 token
    (every row alone) to more than a rank's rows."""
    for seed in range(300):
        rng = random.Random(seed)
        world, rows = rng.randint(1, 8), rng.randint(1, 24)
        skew = rng.choice([1.0, 3.0])  # Pareto shape: heavy-tailed or nearly uniform lengths
        per_rank = [
            [(rng.randint(1, 64), int(rng.paretovariate(skew) * 8)) for _ in range(rows)]
            for _ in range(world)
        ]
        budget = rng.randint(1, 2000)
        _check(per_rank, budget, equal_packs(per_rank, budget))
