"""What an iteration logs (docs/ppo_details.md item 27): rollout, objective, policy and critic metrics, the
ranks' stat sums reduced per optimizer step, the progress line and the run's summary.

Pure: no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from trainers import algos
from trainers.ppo.batch import Rollout
from trainers.ppo.experience import Advantages
from trainers.runs.progress import format_number


def rollout_metrics(
    rollout: Rollout,
    stop_ids: Sequence[int],
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> dict[str, float]:
    """``rollout/*``: mean response length; ``eos_rate``, the share of responses whose last token is one
    of ``stop_ids`` (docs/ppo_details.md item 28); ``truncated_rate``, the share that hit the length limit
    without one (vLLM's finish reason, item 29; only when the rollout carries finish reasons); and --
    when vLLM's log-probs are present -- their mismatch with the trained policy's (item 5, 26): mean and
    max absolute difference over real response tokens. ``rollout/ref_logprob_diff`` is the same mean for
    policy vs reference: once the policy has moved, a weight sync that did not reach vLLM shows up as a vLLM
    mismatch of that size."""
    mask = rollout.tokens.response_mask
    lengths = mask.sum(-1)  # (N,)
    last = algos.last_token_index(mask).clamp(min=0)  # (N,)
    last_ids = rollout.tokens.responses().gather(1, last.unsqueeze(1)).squeeze(1)  # (N,)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=last_ids.dtype)
    ended = torch.isin(last_ids, stops) & (lengths > 0)  # (N,)
    out = {
        "rollout/response_length": float(lengths.float().mean()),
        "rollout/eos_rate": float(ended.float().mean()),
    }
    if rollout.truncated is not None:
        out["rollout/truncated_rate"] = float(rollout.truncated.float().mean())
    if old_logprobs is not None and rollout.vllm_logprobs is not None:
        diff = (rollout.vllm_logprobs - old_logprobs.float()).abs()  # (N, R)
        out["rollout/vllm_logprob_diff"] = float(algos.masked_mean(diff, mask))
        out["rollout/vllm_logprob_diff_max"] = float(torch.where(mask.bool(), diff, torch.zeros(())).max())
    if old_logprobs is not None and ref_logprobs is not None:
        ref_diff = (old_logprobs.float() - ref_logprobs.float()).abs()  # (N, R)
        out["rollout/ref_logprob_diff"] = float(algos.masked_mean(ref_diff, mask))
    return out


def objective_metrics(
    adv: Advantages,
    raw_scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    sources: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``objective/*`` (docs/ppo_details.md item 14, 27, 29): KL as the mean per-sequence sum (the quantity
    the adaptive controller tracks), the coefficient, raw scores (the weighted sum of the sources, before
    any clip or penalty) and used ones, how many responses got the missing-stop penalty, the KL part of the
    reward and the total shaped reward per sequence; ``reward/<name>``, each source's mean score before
    weighting; ``value/*`` only with a critic (absent, not zero, in critic-free runs)."""
    non_score = algos.masked_sum(-kl_coef * adv.kl, mask, dim=-1)  # (N,)
    out = {
        "objective/penalised_responses": float(adv.penalised.sum()),
        "objective/kl": float(algos.mean_sequence_kl(adv.kl, mask)),
        "objective/kl_coef": float(kl_coef),
        "objective/score": float(raw_scores.float().mean()),
        "objective/score_used": float(adv.scores.mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/reward_total": float(algos.masked_sum(adv.rewards, mask, dim=-1).mean()),
    }
    if sources:
        out |= {f"reward/{name}": float(score.float().mean()) for name, score in sources.items()}
    if adv.values is not None:
        out["value/mean"] = float(algos.masked_mean(adv.values, mask))
        out["value/returns_mean"] = float(algos.masked_mean(adv.returns, mask))
    return out


def sum_over_ranks(per_rank: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """Per optimizer step, add the ranks' stat sums (keys starting ``max_`` take the maximum, and so does
    ``skipped``, the non-finite-step flag every rank of a role reports alike)."""
    steps = []
    for step_stats in zip(*per_rank):
        merged: dict[str, float] = {}
        for stats in step_stats:
            for key, value in stats.items():
                if key.startswith("max_") or key == "skipped":
                    merged[key] = max(merged.get(key, value), value)
                else:
                    merged[key] = merged.get(key, 0.0) + value
        steps.append(merged)
    return steps


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _applied_mean(num: float, den: float) -> float:
    """A mean over the applied steps: NaN (``null`` in metrics.jsonl) when every step was skipped."""
    return num / den if den else math.nan


def policy_metrics(
    steps: Sequence[dict[str, float]],
    ptx_tokens: Sequence[int] | None = None,
    denominators: Sequence[float] | None = None,
) -> dict[str, float]:
    """``loss/policy``, ``loss/ptx`` and ``policy/*`` as token means over the applied optimizer steps of
    the iteration, from the summed stats the policy ranks return (``ptx_tokens``: the driver's global ptx
    token count of each step); ``policy/grad_norm`` is the mean pre-clip norm over applied steps;
    ``policy/skipped_steps`` counts the steps skipped for a non-finite loss or gradient (left out of every
    mean: their sums are NaN); plus ``sanity/first_*`` for the first minibatch of the first epoch, where
    the ratio must be exactly 1 (docs/ppo_details.md item 25). ``denominators``: each step's policy-loss
    denominator under ``ppo.loss_agg`` (default: its tokens), which ``loss/policy`` and ``loss/kl`` (the
    KL loss term, when on) divide by."""
    kept = [i for i, s in enumerate(steps) if not s.get("skipped")]
    keys = {k for s in steps for k in s}
    total = {k: sum(steps[i].get(k, 0.0) for i in kept) for k in keys}
    n = total["tokens"]
    loss_n = sum(denominators[i] for i in kept) if denominators is not None else n
    ratio_mean = _applied_mean(total["ratio_sum"], n)
    out = {
        "loss/policy": _applied_mean(total["loss_sum"], loss_n),
        "policy/clipfrac": _applied_mean(total["clip_sum"], n),
        "policy/approx_kl": _applied_mean(total["approx_kl_sum"], n),
        "policy/entropy": _applied_mean(total["entropy_sum"], n),
        "policy/ratio_mean": ratio_mean,
        "policy/ratio_std": math.sqrt(max(0.0, _applied_mean(total["ratio_sq_sum"], n) - ratio_mean**2)),
        "policy/grad_norm": _applied_mean(total["max_grad_norm"], len(kept)),
        "policy/skipped_steps": float(len(steps) - len(kept)),
    }
    if "kl_loss_sum" in total:
        out["loss/kl"] = _applied_mean(total["kl_loss_sum"], loss_n)
    if ptx_tokens:
        out["loss/ptx"] = _applied_mean(total.get("ptx_sum", 0.0), sum(ptx_tokens[i] for i in kept))
    first = steps[0]
    out["sanity/first_ratio_mean"] = _ratio(first["ratio_sum"], first["tokens"])
    out["sanity/first_approx_kl"] = _ratio(first["approx_kl_sum"], first["tokens"])
    out["sanity/first_max_abs_log_ratio"] = first["max_abs_log_ratio"]
    return out


def critic_metrics(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """``loss/value`` and ``value/clipfrac`` as token means over the applied optimizer steps of the
    iteration; ``value/skipped_steps`` counts the skipped (non-finite) ones."""
    kept = [s for s in steps if not s.get("skipped")]
    n = sum(s["tokens"] for s in kept)
    return {
        "loss/value": _applied_mean(sum(s["loss_sum"] for s in kept), n),
        "value/clipfrac": _applied_mean(sum(s["clip_sum"] for s in kept), n),
        "value/skipped_steps": float(len(steps) - len(kept)),
    }


def iteration_line(it: int, total: int, m: dict[str, float]) -> str:
    keys = (
        "objective/score",
        "objective/kl",
        "loss/policy",
        "loss/value",
        "loss/ptx",
        "rollout/response_length",
    )
    parts = [f"ppo iter {it}/{total}"] + [f"{k.split('/')[1]} {format_number(m[k])}" for k in keys if k in m]
    t = sum(v for k, v in m.items() if k.startswith("timing/"))
    return " ".join(parts) + f" ({t:.1f}s)"


def summarize(records: list[dict], iterations: int, wall: float, out: Path, resumed_from: int) -> dict:
    """``summary.json``: the last iteration's metrics, the mean score of the first and last quarter of the
    run (did the policy improve against the RM?), wall time and where the model is."""
    summary = {f"ppo/{k}": v for k, v in records[-1].items() if k != "step"} if records else {}
    scores = [r["objective/score"] for r in records if "objective/score" in r]
    if scores:
        q = max(1, len(scores) // 4)
        summary["ppo/score_first_quarter"] = sum(scores[:q]) / q
        summary["ppo/score_last_quarter"] = sum(scores[-q:]) / q
    summary |= {
        "ppo/iterations": iterations,
        "ppo/resumed_from_iteration": resumed_from,
        "ppo/wall_time_s": round(wall, 2),
        "model_dir": str(out / "model"),
    }
    return summary
