"""Evaluation while training (``ppo.eval_every``; docs/design.md, issue 15): the held-out prompts
(``prompts/valid``, the first ``ppo.eval_prompts``), one sample each at the rollout temperature with the
same seed every time (so two evaluations differ only by the policy), scored by every reward source, and the
KL of the policy to the reference on those samples; logged as ``eval/*``.
"""

from __future__ import annotations

from trainers import algos
from trainers.config import Config
from trainers.ppo.metrics import rollout_metrics
from trainers.ppo.roles import Roles
from trainers.ppo.sampling import generate, rollout_sampling, to_rollout
from trainers.ppo.schedule import derived_seed
from trainers.ppo.scoring import RewardScorer, score_rollout
from trainers.ppo.setup import RunData

EVAL_SEED = 77_777
"""Mixed into the evaluation's engine seeds (never an iteration number of a real run)."""


def evaluate(
    roles: Roles, cfg: Config, data: RunData, scorer: RewardScorer, iteration: int
) -> dict[str, float]:
    """``eval/*`` after ``iteration``: ``score`` (the weighted sum of the sources), ``reward/<name>`` per
    source, ``kl`` (mean per-sequence k1 sum of policy vs reference), ``response_length``, ``eos_rate``
    and ``truncated_rate``."""
    prompts = data.eval_prompts
    samples = generate(
        roles,
        prompts,
        rollout_sampling(cfg, 1),
        lambda e: derived_seed(cfg.ppo.seed, EVAL_SEED, e),
        f"evaluation after iteration {iteration}",
    )
    rollout = to_rollout(prompts, samples, data)
    mask = rollout.tokens.response_mask
    pending = scorer.submit(rollout.tokens, data.eval_records)
    names = ["old_logprobs", "ref_logprobs"] + ["rm"] * (roles.reward is not None)
    passes = score_rollout(roles, rollout.tokens, names)
    sources = scorer.collect(pending, passes.get("rm"), iteration)
    kl = algos.kl_estimate(passes["old_logprobs"], passes["ref_logprobs"], "k1", mask)  # (N, R)
    out = {
        "eval/score": float(scorer.combine(sources).mean()),
        "eval/kl": float(algos.mean_sequence_kl(kl, mask)),
    }
    out |= {f"eval/reward/{name}": float(score.mean()) for name, score in sources.items()}
    lengths = rollout_metrics(rollout, data.stop_ids)
    out |= {key.replace("rollout/", "eval/"): value for key, value in lengths.items()}
    return out
