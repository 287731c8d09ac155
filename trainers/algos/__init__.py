"""Pure RLHF maths: KL estimates, reward shaping, GAE and group advantages, whitening, losses, KL control.

Imports only torch and the standard library (no Ray, DeepSpeed, vLLM or transformers), so every function
is unit-testable in isolation. Tensors are ``(B, T)`` over response tokens unless stated otherwise;
``mask`` is 1 on real response tokens (up to and including EOS) and 0 on padding.

Equations, sources and the docs/ppo_details.md items each function implements: docs/algorithms.md.
"""

from __future__ import annotations

from trainers.algos._common import AlgoConfigError
from trainers.algos.advantages import discounted_returns, gae, reinforce_pp_advantages
from trainers.algos.controllers import (
    ADAPTIVE_ERROR_CLIP,
    KL_CONTROLLER_KINDS,
    AdaptiveKLController,
    FixedKLController,
    make_kl_controller,
)
from trainers.algos.groups import (
    GROUP_KINDS,
    GROUP_STD_EPS,
    broadcast_to_tokens,
    group_advantages,
    group_is_constant,
)
from trainers.algos.kl import KL_KINDS, kl_estimate, mean_sequence_kl
from trainers.algos.logprobs import entropy_from_logits, logprobs_from_logits, shift_for_lm
from trainers.algos.losses import (
    LOG_RATIO_CLAMP,
    LOSS_AGG_MODES,
    agg_denominator,
    agg_weights,
    aggregate,
    kl_loss,
    lm_loss,
    loss_normaliser,
    policy_loss,
    value_loss,
)
from trainers.algos.masked import (
    WHITEN_EPS,
    last_token_index,
    masked_count,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_to_mean_var,
    whiten_with,
)
from trainers.algos.ranking import ranking_loss
from trainers.algos.rewards import combine_scores, normalize_scores, overlong_penalty, shape_rewards

__all__ = [
    "ADAPTIVE_ERROR_CLIP",
    "GROUP_KINDS",
    "GROUP_STD_EPS",
    "KL_CONTROLLER_KINDS",
    "KL_KINDS",
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "WHITEN_EPS",
    "AdaptiveKLController",
    "AlgoConfigError",
    "FixedKLController",
    "agg_denominator",
    "agg_weights",
    "aggregate",
    "broadcast_to_tokens",
    "combine_scores",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "group_is_constant",
    "kl_estimate",
    "kl_loss",
    "last_token_index",
    "lm_loss",
    "logprobs_from_logits",
    "loss_normaliser",
    "make_kl_controller",
    "masked_count",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_sequence_kl",
    "moments_to_mean_var",
    "normalize_scores",
    "overlong_penalty",
    "policy_loss",
    "ranking_loss",
    "reinforce_pp_advantages",
    "shape_rewards",
    "shift_for_lm",
    "value_loss",
    "whiten_with",
]
