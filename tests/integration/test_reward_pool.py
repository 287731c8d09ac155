"""The reward function's CPU actors on a real local Ray: scores in row order, failures with their rows, shutdown."""

from __future__ import annotations

import random
import time

import pytest

from actors.reward_function import FunctionRewardPool, unwrap_reward_error
from trainers.data import gold
from trainers.data.templates import TASKS
from trainers.data.world_text import sample_prompt
from trainers.rewards import RewardSourceError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAILING = """
import math

def nan_on_bad(prompts, responses, rows):
    return [math.nan if row.get("bad") else 1.0 for row in rows]

def raise_on_bad(prompts, responses, rows):
    if any(row.get("bad") for row in rows):
        raise ValueError("cannot score this row")
    return [1.0] * len(rows)
"""


def world_batch(n: int) -> tuple[list[str], list[str], list[dict]]:
    """``n`` world prompts with responses of mixed quality (best, with filler, empty, off-topic)."""
    rng = random.Random(11)
    names = list(TASKS)
    prompts = [sample_prompt(names[i % len(names)], rng) for i in range(n)]
    kinds = [
        gold.best_response,
        lambda p: "Basically, " + gold.best_response(p),
        lambda p: "",
        lambda p: "The weather is nice today.",
    ]
    responses = [kinds[i % len(kinds)](p) for i, p in enumerate(prompts)]
    return prompts, responses, [{"prompt": p, "id": i} for i, p in enumerate(prompts)]


def test_two_workers_give_the_in_process_gold_scores_in_row_order(ray_local):
    prompts, responses, rows = world_batch(10)
    expected = gold.reward(prompts, responses, rows)
    assert len(set(expected)) > 2  # the order is checked by different values
    pool = FunctionRewardPool("trainers.data.gold:reward", workers=2, name_prefix="test-rewards")
    try:
        refs = pool.submit(prompts, responses, rows)
        assert len(refs) == 2
        assert pool.collect(refs) == expected
        assert pool.scores(prompts[:1], responses[:1], rows[:1]) == expected[:1]  # one part, one worker
        assert pool.scores([], [], []) == []
        named = set(ray_local.util.list_named_actors())
        assert {"test-rewards-reward_function-0", "test-rewards-reward_function-1"} <= named
    finally:
        pool.shutdown()


def test_a_failing_function_reports_the_absolute_row_through_collect(ray_local, tmp_path, monkeypatch):
    (tmp_path / "failing.py").write_text(FAILING)
    monkeypatch.chdir(tmp_path)  # a relative file spec, resolved where the pool starts
    prompts, responses, rows = world_batch(10)
    rows[7]["bad"] = True
    nan_pool = FunctionRewardPool("failing.py:nan_on_bad", workers=2)
    raise_pool = FunctionRewardPool("failing.py:raise_on_bad", workers=2)
    try:
        with pytest.raises(RewardSourceError) as err:
            nan_pool.collect(nan_pool.submit(prompts, responses, rows))
        assert type(err.value) is RewardSourceError  # the worker's error itself, not Ray's wrapper
        assert err.value.row == 7
        assert (
            str(err.value)
            == f"reward.function='{tmp_path / 'failing.py'}:nan_on_bad': row 7: the score is nan"
        )

        with pytest.raises(RewardSourceError) as err:
            raise_pool.scores(prompts, responses, rows)
        assert err.value.row == 5  # the first row of the second worker's part, rows 5..9
        assert "raised ValueError: cannot score this row on the rows 5..9" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        nan_pool.shutdown()
        raise_pool.shutdown()


def test_unwrap_finds_the_reward_error_inside_rays_task_error(ray_local):
    pool = FunctionRewardPool("trainers.data.gold:reward", workers=1)
    try:
        ref = pool.actors[0].scores.remote(["Hi?"], [3], [{}], 4)  # a non-string response: gold raises
        with pytest.raises(ray_local.exceptions.RayTaskError) as err:
            ray_local.get(ref)
        found = unwrap_reward_error(err.value)
        assert type(found) is RewardSourceError and found.row == 4
        assert unwrap_reward_error(ValueError("other")) is None
    finally:
        pool.shutdown()


def test_shutdown_stops_every_actor(ray_local):
    pool = FunctionRewardPool("trainers.data.gold:reward", workers=2, name_prefix="test-rewards-stop")
    actors = list(pool.actors)
    assert pool.scores(["Hi?"], ["Hello."], [{}]) == gold.reward(["Hi?"], ["Hello."], [{}])
    pool.shutdown()
    # ray.kill is asynchronous: under load a call sent right after it can still be served once.
    deadline = time.monotonic() + 60
    for actor in actors:
        while True:
            try:
                ray_local.get(actor.scores.remote(["Hi?"], ["Hello."], [{}], 0), timeout=60)
            except ray_local.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a reward worker still answers 60 s after shutdown"
            time.sleep(0.5)
    assert not [n for n in ray_local.util.list_named_actors() if n.startswith("test-rewards-stop-")]
