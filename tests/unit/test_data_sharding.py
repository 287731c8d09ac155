"""trainers.data.sharding: equal shards with padding, contiguous parts, micro-batches, evaluation batches."""

from __future__ import annotations

import pytest
import torch

from trainers.data.sharding import (
    contiguous_bounds,
    equal_shards,
    eval_batches,
    micro_batches,
    rank_share,
    split_sizes,
    unshard,
)


def test_equal_shards_pad_the_short_ones_with_the_last_row():
    shards = equal_shards(5, 2)  # ceil(5 / 2) = 3 rows each; the second shard has 2 real rows
    assert [s.indices.tolist() for s in shards] == [[0, 1, 2], [3, 4, 4]]
    assert [s.num_real for s in shards] == [3, 2]
    assert [s.indices.tolist() for s in equal_shards(3, 4)] == [[0], [1], [2], [2]]
    assert [s.num_real for s in equal_shards(3, 4)] == [1, 1, 1, 0]


@pytest.mark.parametrize("n,world", [(8, 2), (5, 2), (3, 4), (7, 3), (1, 1)])
def test_shards_are_equal_sized_and_unshard_restores_order(n, world):
    shards = equal_shards(n, world)
    assert len({len(s.indices) for s in shards}) == 1  # lock-step: same number of rows on every rank
    assert sum(s.num_real for s in shards) == n
    data = torch.arange(n) * 10
    parts = [data.index_select(0, s.indices) for s in shards]
    assert unshard(parts, shards).tolist() == [10 * i for i in range(n)]


def test_split_sizes_and_bounds_are_contiguous_larger_first():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert contiguous_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert contiguous_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="at least one part"):
        split_sizes(3, 0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shares_put_the_batch_back_together(world):
    batch = [11, 12, 13, 14, 15, 16, 17, 18]
    shares = [rank_share(batch, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == batch
    assert all(len(s) == 8 // world for s in shares)
    assert rank_share(batch, 1, 4) == [13, 14]
    with pytest.raises(ValueError, match="do not split evenly"):
        rank_share(batch, 0, 3)


def test_micro_batches_of_lists_tensors_and_dicts():
    assert micro_batches([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
    pieces = micro_batches(torch.arange(6).view(3, 2), 2)
    assert [p.tolist() for p in pieces] == [[[0, 1], [2, 3]], [[4, 5]]]
    parts = micro_batches({"a": torch.tensor([1, 2, 3]), "b": torch.tensor([4, 5, 6])}, 2)
    assert [(p["a"].tolist(), p["b"].tolist()) for p in parts] == [([1, 2], [4, 5]), ([3], [6])]
    with pytest.raises(ValueError, match="different row counts"):
        micro_batches({"a": [1, 2], "b": [1]}, 1)


def test_eval_batches_pad_with_uncounted_repeats_of_the_first_batch():
    # 7 rows in batches of 3: [0,1,2] [3,4,5] [6]; 2 ranks need an even count, so [0,1,2] comes back once
    # more, not counted.
    assert eval_batches(7, 3, 0, 2) == [([0, 1, 2], True), ([6], True)]
    assert eval_batches(7, 3, 1, 2) == [([3, 4, 5], True), ([0, 1, 2], False)]
    assert eval_batches(0, 3, 0, 2) == []


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (4, 4, 2), (7, 2, 3), (1, 8, 2)])
def test_eval_batches_cover_every_example_once_with_equal_batch_counts(n, batch, world):
    shards = [eval_batches(n, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of (collective) forwards on every rank
    counted = sorted(i for s in shards for indices, c in s if c for i in indices)
    assert counted == list(range(n))
