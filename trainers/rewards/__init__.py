"""Reward sources besides the learned reward model: a Python function and an HTTP endpoint.

Building blocks the PPO driver puts together (docs/design.md, "Estimators, reward sources, evaluation
while training (issue 15)"): :mod:`trainers.rewards.function` finds, calls and checks a user's
``fn(prompts, responses, rows)``; :mod:`trainers.rewards.http` POSTs batches to ``reward.url``. The
function runs in CPU actors (``actors/reward_function.py``); this package imports only the standard
library, so it loads and tests in any process without Ray.
"""

from __future__ import annotations

from trainers.rewards.function import (
    RewardFn,
    RewardSourceError,
    absolute_spec,
    call_reward_function,
    check_scores,
    load_reward_function,
)
from trainers.rewards.http import HttpReward, check_endpoint

__all__ = [
    "HttpReward",
    "RewardFn",
    "RewardSourceError",
    "absolute_spec",
    "call_reward_function",
    "check_endpoint",
    "check_scores",
    "load_reward_function",
]
