"""trainers.stages.batching: step planning and the seeded data order (the union over ranks is the global batch)."""

from __future__ import annotations

import pytest

from trainers.data.sharding import rank_share
from trainers.stages.batching import epoch_order, plan_steps, step_indices


def test_plan_steps_drops_the_partial_batch_and_max_steps_only_stops_early():
    assert plan_steps(100, 32, epochs=2, max_steps=-1) == (3, 6, 6)
    assert plan_steps(100, 32, epochs=2, max_steps=4) == (3, 6, 4)  # the schedule still spans 6 steps
    assert plan_steps(100, 32, epochs=2, max_steps=50) == (3, 6, 6)
    assert plan_steps(10, 32, epochs=3, max_steps=-1) == (0, 0, 0)


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch():
    a = epoch_order(50, seed=0, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=0, epoch=0)
    assert a != epoch_order(50, seed=0, epoch=1)
    assert a != epoch_order(50, seed=1, epoch=0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_union_over_ranks_is_the_global_batch_whatever_the_world_size(world):
    order = epoch_order(64, seed=3, epoch=0)
    batch = step_indices(order, index_in_epoch=1, global_batch=16)
    assert batch == order[16:32]
    shares = [rank_share(batch, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == batch
    assert all(len(s) == 16 // world for s in shares)
