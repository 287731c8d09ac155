"""PPO-ptx driver: one controller process that moves token ids and small per-token tensors between
Ray actor groups (policy, critic, reference, reward, vLLM rollout) and does the cheap maths itself.

    rlhf ppo --config trainers/configs/tiny.yaml --out /tmp/ppo \\
        data.dir=/tmp/world model.path=/tmp/sft/model reward.path=/tmp/rm/model

One iteration (docs/design.md, "PPO-ptx data flow"):

1. generate   prompts -> vLLM engines (n samples each, a seed per engine and iteration) -> responses
              cut after their first EOS;
2. experience old log-probs (policy's training engine), reference log-probs, RM scores, values, all
              in flight together; then KL -> shaped rewards -> GAE -> advantages whitened over the batch;
3. train      ppo_epochs x freshly shuffled minibatches, one optimizer step each; policy (PPO clip +
              ptx_coef x LM loss on pretraining text) and critic (clipped value loss) in parallel;
4. sync       gathered policy weights -> every vLLM engine;
5. KL controller update, metrics, checkpoint.

The first half of this module is pure (lists and tensors in, tensors out; unit-tested without Ray);
the second half starts actors and runs the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.resources import RoleRequest, role_bundles
from trainers import algos
from trainers.config import Config, dump_yaml, to_dict
from trainers.data import read_records
from trainers.data.collate import collate_lm, text_windows
from trainers.data.io import data_path
from trainers.data.sharding import contiguous_bounds, equal_shards, split_sizes, unshard
from trainers.data.validate import MAX_PROBLEMS, raise_if_problems
from trainers.errors import ConfigError, DataError, RunStopped
from trainers.files import atomic_write_json
from trainers.runs.metrics import MetricsWriter, read_metrics, truncate_metrics
from trainers.runs.outdir import prepare_output
from trainers.runs.progress import format_number
from trainers.runs.resume import check_run_shape, resume_hint
from trainers.runs.sinks import open_sinks

# --------------------------------------------------------------------------------------------------
# Pure helpers: seeds, data positions, rollout batches, shards, minibatch plans, metrics
# --------------------------------------------------------------------------------------------------

_SEED_MOD = 2**31 - 1


def derived_seed(seed: int, *parts: int) -> int:
    """A deterministic seed for (seed, parts...) -- e.g. (seed, iteration, engine) for sampling
    (PPO_DETAILS 6: each engine its own seed). Every random choice of a run is derived from the config
    seed and the iteration this way, so a resumed run needs no saved generator state."""
    value = seed % _SEED_MOD
    for part in parts:
        value = (value * 1_000_003 + part + 1) % _SEED_MOD
    return value


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """``(num_rows,)`` permutation used for pass ``epoch`` over a dataset (prompts or ptx text)."""
    g = torch.Generator().manual_seed(derived_seed(seed, epoch))
    return torch.randperm(num_rows, generator=g)


def take_rows(position: int, count: int, num_rows: int, seed: int) -> list[int]:
    """Row indices ``position .. position + count - 1`` of the endless stream of shuffled passes over a
    dataset of ``num_rows`` rows: pass e is :func:`epoch_order` ``(num_rows, seed, e)``. The caller keeps
    ``position`` (rows consumed so far); that single integer is the data position a checkpoint stores."""
    if num_rows < 1:
        raise ValueError("cannot take rows from an empty dataset")
    rows: list[int] = []
    epoch, offset = divmod(position, num_rows)
    while len(rows) < count:
        order = epoch_order(num_rows, seed, epoch)
        rows.extend(order[offset : offset + count - len(rows)].tolist())
        epoch, offset = epoch + 1, 0
    return rows


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """Response tokens up to and including the first EOS (PPO_DETAILS 4); unchanged if there is none."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def build_rollout_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
    vllm_logprobs: Sequence[Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Token tensors of one rollout: row i is prompt i left-padded to P, then response i (cut after its
    first EOS) right-padded to R (PPO_DETAILS 1, 4).

    Returns ``sequences (N, P+R)``, ``attention_mask (N, P+R)``, ``response_mask (N, R)`` (1 on response
    tokens up to and including EOS) and, if given, ``vllm_logprobs (N, R)`` (0 on padding). PAD must not
    be EOS (item 2): masks come from lengths here, but every model pass downstream trusts them.
    """
    if pad_id == eos_id:
        raise ValueError("PAD and EOS must be different tokens (PPO_DETAILS 2)")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    cut = [cut_at_eos(r, eos_id) for r in responses]
    n, p_len = len(prompts), max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in cut))  # at least one column so shapes stay valid
    sequences = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)  # (N, P+R)
    attention_mask = torch.zeros((n, p_len + r_len), dtype=torch.long)  # (N, P+R)
    for i, (prompt, response) in enumerate(zip(prompts, cut)):
        sequences[i, p_len - len(prompt) : p_len] = torch.tensor(prompt, dtype=torch.long)
        sequences[i, p_len : p_len + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, p_len - len(prompt) : p_len + len(response)] = 1
    batch = {
        "sequences": sequences,
        "attention_mask": attention_mask,
        "response_mask": attention_mask[:, p_len:].clone(),  # (N, R)
    }
    if vllm_logprobs is not None:
        lp = torch.zeros((n, r_len), dtype=torch.float32)  # (N, R)
        for i, (values, response) in enumerate(zip(vllm_logprobs, cut)):
            lp[i, : len(response)] = torch.tensor(list(values)[: len(response)], dtype=torch.float32)
        batch["vllm_logprobs"] = lp
    return batch


def select_rows(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of every tensor in ``batch`` (all share dimension 0)."""
    return {k: v.index_select(0, idx) for k, v in batch.items()}


def epoch_permutations(num_rows: int, epochs: int, seed: int, iteration: int) -> list[torch.Tensor]:
    """One fresh ``(num_rows,)`` permutation per PPO epoch of ``iteration`` (PPO_DETAILS 21)."""
    out = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(derived_seed(seed, iteration, epoch, 7))
        out.append(torch.randperm(num_rows, generator=g))
    return out


def minibatches(perms: Sequence[torch.Tensor], mini_batch_size: int) -> list[torch.Tensor]:
    """Row indices of every optimizer step: each epoch's permutation cut into ``mini_batch_size`` rows."""
    steps = []
    for perm in perms:
        if perm.numel() % mini_batch_size:
            raise ValueError(f"{perm.numel()} rows do not split into minibatches of {mini_batch_size}")
        steps.extend(perm.split(mini_batch_size))
    return steps


def rank_plan(
    steps: Sequence[torch.Tensor], world: int, micro_batch_size: int
) -> list[list[list[torch.Tensor]]]:
    """``plan[rank][step]`` = that rank's micro-batches (row indices) of each optimizer step.

    Every step's rows are split evenly over ``world`` ranks, then into micro-batches of
    ``micro_batch_size``; config validation guarantees both divisions are exact, and then every rank runs
    the same number of micro-batches per step (ZeRO-3 lock-step).
    """
    plan: list[list[list[torch.Tensor]]] = [[] for _ in range(world)]
    for rows in steps:
        if rows.numel() % (world * micro_batch_size):
            raise ValueError(
                f"minibatch of {rows.numel()} rows does not split into {world} ranks x micro-batches of {micro_batch_size}"
            )
        for rank, part in enumerate(rows.chunk(world)):
            plan[rank].append(list(part.split(micro_batch_size)))
    return plan


def step_token_counts(response_mask: torch.Tensor, steps: Sequence[torch.Tensor]) -> list[int]:
    """Real response tokens of each optimizer step over all ranks: the denominator of the token-mean
    losses (PPO_DETAILS 24), so every rank divides its sums by the same global count."""
    return [int(response_mask.index_select(0, rows).sum()) for rows in steps]


def lm_label_count(batch: dict[str, torch.Tensor]) -> int:
    """Predicted tokens of an LM batch (``labels`` aligned with ``input_ids``, -100 = ignored): the loss
    shifts by one, so column 0 is never a target."""
    return int((batch["labels"][:, 1:] != -100).sum())


def ptx_plan(
    rows: Sequence[Sequence[int]], world: int, micro_steps: int, pad_id: int
) -> tuple[list[list[dict[str, torch.Tensor] | None]], int]:
    """The pretraining text of one optimizer step, laid out for the policy ranks (PPO_DETAILS 20).

    ``rows`` holds ``world x ptx_batch_size`` token lists; rank r takes the r-th equal part and spreads
    it over its ``micro_steps`` micro-batches (sizes differ by at most one; an empty slot is None, and
    every rank has the same slots, so ZeRO-3 ranks stay in lock-step). Returns ``(plan[rank][micro],
    global count of predicted tokens)`` -- the denominator of the ptx token mean.
    """
    if len(rows) % world:
        raise ValueError(f"{len(rows)} ptx rows do not split over {world} ranks")
    per_rank = len(rows) // world
    plan: list[list[dict[str, torch.Tensor] | None]] = []
    tokens = 0
    for rank in range(world):
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        slots: list[dict[str, torch.Tensor] | None] = []
        start = 0
        for size in split_sizes(per_rank, micro_steps):
            if size == 0:
                slots.append(None)
                continue
            batch = collate_lm([(list(ids), 0) for ids in mine[start : start + size]], pad_id)
            tokens += lm_label_count(batch)
            slots.append(batch)
            start += size
        plan.append(slots)
    return plan, tokens


def compute_advantages(
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    score_clip: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Whole-batch experience maths (PPO_DETAILS 11-17), all ``(N, R)`` except ``scores (N,)``:

    ``kl`` (per token, 0 on padding) -> ``rewards`` = -beta kl + (optionally clipped) score on the last
    real token -> GAE ``advantages``/``returns`` (returns from the raw advantages) -> advantages whitened
    over every real token of the batch (the driver holds all ranks' rows, so this is the global
    whitening of item 17). ``values`` come back zeroed on padding, as the value loss expects.
    """
    mask = response_mask
    kl = algos.kl_estimate(old_logprobs, ref_logprobs, kl_estimator, mask)  # (N, R)
    used_scores = algos.normalize_scores(scores, clip=score_clip if score_clip > 0 else None)  # (N,)
    rewards = algos.shape_rewards(used_scores, kl, mask, kl_coef)  # (N, R)
    advantages, returns = algos.gae(rewards, values, mask, gamma, lam)  # (N, R) each
    return {
        "kl": kl,
        "scores": used_scores,
        "rewards": rewards,
        "values": torch.where(mask.bool(), values.float(), torch.zeros(())),
        "returns": returns,
        "advantages": algos.masked_whiten(advantages, mask),
    }


def rollout_metrics(
    batch: dict[str, torch.Tensor],
    eos_id: int,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> dict[str, float]:
    """``rollout/*``: mean response length, share of responses that ended with EOS, and -- when vLLM's
    log-probs are present -- their mismatch with the training engine's (PPO_DETAILS 5, 26): mean and max
    absolute difference over real response tokens. ``rollout/ref_logprob_diff`` is the same mean for
    policy vs reference: once the policy has moved, a weight sync that did not reach vLLM shows up as a
    vLLM mismatch of that size."""
    mask = batch["response_mask"]
    lengths = mask.sum(-1)  # (N,)
    last = algos.last_token_index(mask).clamp(min=0)  # (N,)
    responses = batch["sequences"][:, -mask.shape[1] :]  # (N, R)
    ended = (responses.gather(1, last.unsqueeze(1)).squeeze(1) == eos_id) & (lengths > 0)
    out = {
        "rollout/response_length": float(lengths.float().mean()),
        "rollout/eos_rate": float(ended.float().mean()),
    }
    if old_logprobs is not None and "vllm_logprobs" in batch:
        diff = (batch["vllm_logprobs"] - old_logprobs.float()).abs()  # (N, R)
        out["rollout/vllm_logprob_diff"] = float(algos.masked_mean(diff, mask))
        out["rollout/vllm_logprob_diff_max"] = float(torch.where(mask.bool(), diff, torch.zeros(())).max())
    if old_logprobs is not None and ref_logprobs is not None:
        ref_diff = (old_logprobs.float() - ref_logprobs.float()).abs()  # (N, R)
        out["rollout/ref_logprob_diff"] = float(algos.masked_mean(ref_diff, mask))
    return out


def objective_metrics(
    exp: dict[str, torch.Tensor], raw_scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> dict[str, float]:
    """``objective/*`` (PPO_DETAILS 14, 27): KL as the mean per-sequence sum (the quantity the adaptive
    controller tracks), the coefficient, raw and used RM scores, the KL part of the reward and the total
    shaped reward per sequence."""
    non_score = algos.masked_sum(-kl_coef * exp["kl"], mask, dim=-1)  # (N,)
    return {
        "objective/kl": float(algos.mean_sequence_kl(exp["kl"], mask)),
        "objective/kl_coef": float(kl_coef),
        "objective/score": float(raw_scores.float().mean()),
        "objective/score_used": float(exp["scores"].mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/reward_total": float(algos.masked_sum(exp["rewards"], mask, dim=-1).mean()),
        "value/mean": float(algos.masked_mean(exp["values"], mask)),
        "value/returns_mean": float(algos.masked_mean(exp["returns"], mask)),
    }


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
    steps: Sequence[dict[str, float]], ptx_tokens: Sequence[int] | None = None
) -> dict[str, float]:
    """``loss/policy``, ``loss/ptx`` and ``policy/*`` as token means over the applied optimizer steps of
    the iteration, from the summed stats the policy ranks return (``ptx_tokens``: the driver's global ptx
    token count of each step); ``policy/grad_norm`` is the mean pre-clip norm over applied steps;
    ``policy/skipped_steps`` counts the steps skipped for a non-finite loss or gradient (left out of every
    mean: their sums are NaN); plus ``sanity/first_*`` for the first minibatch of the first epoch, where
    the ratio must be exactly 1 (PPO_DETAILS 25)."""
    kept = [i for i, s in enumerate(steps) if not s.get("skipped")]
    keys = {k for s in steps for k in s}
    total = {k: sum(steps[i].get(k, 0.0) for i in kept) for k in keys}
    n = total["tokens"]
    ratio_mean = _applied_mean(total["ratio_sum"], n)
    out = {
        "loss/policy": _applied_mean(total["loss_sum"], n),
        "policy/clipfrac": _applied_mean(total["clip_sum"], n),
        "policy/approx_kl": _applied_mean(total["approx_kl_sum"], n),
        "policy/entropy": _applied_mean(total["entropy_sum"], n),
        "policy/ratio_mean": ratio_mean,
        "policy/ratio_std": math.sqrt(max(0.0, _applied_mean(total["ratio_sq_sum"], n) - ratio_mean**2)),
        "policy/grad_norm": _applied_mean(total["max_grad_norm"], len(kept)),
        "policy/skipped_steps": float(len(steps) - len(kept)),
    }
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


# --- checkpoint directories ---------------------------------------------------------------------------

_CKPT_RE = re.compile(r"^iter_(\d{6,})$")


def checkpoint_name(iteration: int) -> str:
    """``iter_NNNNNN``: the checkpoint taken after ``iteration`` iterations."""
    return f"iter_{iteration:06d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first. A checkpoint is complete once renamed from its
    ``.tmp`` name, which happens after everything in it was written."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def rotate_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints and any leftover ``.tmp`` directory;
    returns what was deleted."""
    root = Path(root)
    doomed = complete_checkpoints(root)[:-keep] if keep > 0 else complete_checkpoints(root)
    doomed += [p for p in root.glob("iter_*.tmp") if p.is_dir()] if root.is_dir() else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------------------------------
# Validation and run set-up (driver side, before any actor starts)
# --------------------------------------------------------------------------------------------------

STATE_FILE = "driver_state.json"
"""Driver part of a checkpoint: iteration, KL controller, data positions, run shape."""


@dataclass
class RunData:
    """Tokenized inputs of a run, built once on the driver during validation."""

    prompts: list[list[int]]
    """Every training prompt, chat-formatted and encoded (BOS + prompt), unpadded."""
    ptx: list[list[int]]
    """Pretraining text windows of at most ``model.max_len`` tokens (empty when ptx is off)."""
    pad_id: int
    eos_id: int


@dataclass
class DriverState:
    """Everything the driver needs to continue a run exactly; saved in every checkpoint.

    Every random choice (prompt order, minibatch order, sampling seeds) is derived from the config seed
    and the iteration (:func:`derived_seed`), so these counters are the whole of the driver's RNG state.
    """

    iteration: int = 0
    """Iterations completed."""
    prompt_position: int = 0
    """Prompts consumed so far (position in the endless shuffled prompt stream, :func:`take_rows`)."""
    ptx_position: int = 0
    """Pretraining windows consumed so far."""
    kl_controller: dict = field(default_factory=dict)
    """The KL controller's ``state_dict`` (its current coefficient)."""
    shape: dict = field(default_factory=dict)
    """:func:`run_shape` of the run that wrote the checkpoint."""
    nonfinite_streak: dict = field(default_factory=dict)
    """Per training role (``policy``, ``critic``): optimizer steps skipped in a row (non-finite loss or
    gradient) up to the end of the last iteration. Saved, so a resumed run stops where an uninterrupted
    one would (``trainers.runtime.nonfinite``)."""


def run_shape(cfg: Config) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: DeepSpeed ZeRO-3 states are
    partitioned per rank, and the KL controller state is of one kind."""
    p = cfg.ppo
    return {
        "policy_workers": p.policy_workers,
        "critic_workers": p.critic_workers,
        "zero_stage": p.zero_stage,
        "kl_controller": "adaptive" if p.adaptive_kl else "fixed",
    }


def check_resumable(checkpoint: Path | None, cfg: Config) -> None:
    """ConfigError (before any actor starts) if the newest checkpoint was made with another run shape."""
    if checkpoint is None:
        return
    saved = json.loads((checkpoint / STATE_FILE).read_text()).get("shape", {})
    check_run_shape(saved, run_shape(cfg), checkpoint)


def read_prompts(cfg: Config, tokenizer) -> list[list[int]]:
    """Validated ``prompts/train`` encoded with the chat format; a DataError lists the prompts that leave
    no room for ``rollout.max_new_tokens`` within ``model.max_len``."""
    from trainers.data.collate import encode_prompt

    path = data_path(cfg.data.dir, "prompts", "train")
    encoded = [encode_prompt(tokenizer, r["prompt"]) for r in read_records("prompts", [path])]
    room = cfg.model.max_len - cfg.rollout.max_new_tokens
    lines = [
        f"{path}:{row + 1}: prompt is {len(ids)} tokens long; with rollout.max_new_tokens="
        f"{cfg.rollout.max_new_tokens} it exceeds model.max_len={cfg.model.max_len}"
        for row, ids in enumerate(encoded)
        if len(ids) > room
    ][:MAX_PROBLEMS]
    raise_if_problems(lines)
    if not encoded:
        raise DataError(f"{path}: no prompts")
    return encoded


def validate_run(cfg: Config, out_dir: str | os.PathLike) -> tuple[Path, RunData]:
    """Everything the user can get wrong, except resources, checked before anything starts or is
    written: output directory, both model directories (config.json + safetensors), tokenizer (PAD !=
    EOS, the same in the RM directory), prompts and -- with ``ppo.ptx_coef > 0`` -- the pretraining text."""
    from trainers.config import tokenizer_dir
    from trainers.data.tokenizer import load_tokenizer
    from trainers.runs.outdir import check_output_dir
    from trainers.runtime.models import check_model_dir

    out = check_output_dir(out_dir)
    check_model_dir(cfg.model.path, "model.path")
    rm_dir = check_model_dir(cfg.reward.path, "reward.path")
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    rm_tokenizer = load_tokenizer(rm_dir) if (rm_dir / "tokenizer.json").is_file() else None
    if rm_tokenizer is not None and rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"reward.path='{rm_dir}' has another tokenizer than the policy ({tokenizer_dir(cfg)}); the reward "
            "model must read the policy's token ids (PPO_DETAILS 7)"
        )
    prompts = read_prompts(cfg, tokenizer)
    ptx: list[list[int]] = []
    if cfg.ppo.ptx_coef > 0:
        records = read_records("pretrain", [data_path(cfg.data.dir, "pretrain", "train")])
        ptx = text_windows(tokenizer, [r["text"] for r in records], cfg.model.max_len)
        if not ptx:
            raise DataError("ppo.ptx_coef > 0 but pretrain/train holds no text")
    return out, RunData(prompts, ptx, tokenizer.pad_token_id, tokenizer.eos_token_id)


def role_specs(cfg: Config, device: str) -> dict:
    """Each DeepSpeed role's :class:`actors.base.EngineSpec`: only what that actor needs (STYLE).

    Policy and reference start from ``model.path`` (SFT), reward and critic from ``reward.path`` (RM).
    """
    from actors.base import EngineSpec, TrainSpec
    from trainers.runtime.device import resolve_dtype

    p = cfg.ppo
    common = {
        "device": device,
        "dtype": resolve_dtype(cfg.model.dtype, device),
        "zero_stage": p.zero_stage,
        "micro_batch_size": p.micro_batch_size,
        "temperature": cfg.rollout.temperature,
        "torch_threads": cfg.cluster.torch_threads,
        "seed": p.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    sft, rm = str(Path(cfg.model.path).resolve()), str(Path(cfg.reward.path).resolve())
    train = {"weight_decay": p.weight_decay, "grad_clip": p.grad_clip}
    return {
        "policy": TrainSpec(
            model_path=sft,
            lr=p.policy_lr,
            grad_accum=p.mini_batch_size // (p.micro_batch_size * p.policy_workers),
            clip_eps=p.clip_eps,
            ptx_coef=p.ptx_coef,
            tokenizer_path=str(tokenizer_dir_of(cfg)),
            **train,
            **common,
        ),
        "critic": TrainSpec(
            model_path=rm,
            lr=p.critic_lr,
            grad_accum=p.mini_batch_size // (p.micro_batch_size * p.critic_workers),
            clip_eps=p.value_clip_eps,
            **train,
            **common,
        ),
        "reference": EngineSpec(model_path=sft, **common),
        "reward": EngineSpec(model_path=rm, **common),
    }


def tokenizer_dir_of(cfg: Config) -> Path:
    """The run's tokenizer directory, absolute (actors may run elsewhere)."""
    from trainers.config import tokenizer_dir

    return tokenizer_dir(cfg).resolve()


def rollout_kwargs(cfg: Config, device: str) -> dict:
    """Keyword arguments of every :class:`actors.rollout.RolloutEngine` (the seed is added per engine)."""
    from trainers.runtime.device import resolve_dtype, vllm_dtype

    dtype = vllm_dtype(resolve_dtype(cfg.model.dtype, device))
    kwargs = {
        "device": device,
        "dtype": dtype,
        "tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
        "max_model_len": cfg.model.max_len,
        "enforce_eager": cfg.rollout.enforce_eager,
        "enable_sleep_mode": device == "cuda" and cfg.cluster.placement == "colocated",
    }
    if device == "cpu":
        # On CPU the fraction is of host memory and fails at start-up when others hold memory.
        kwargs["kv_cache_memory_bytes"] = cfg.rollout.kv_cache_mb * 2**20
    return kwargs


# --------------------------------------------------------------------------------------------------
# Actors
# --------------------------------------------------------------------------------------------------


@dataclass
class Roles:
    """The running actor groups of one PPO run and their placement groups."""

    policy: Any
    critic: Any
    reference: Any
    reward: Any
    rollout: Any
    placements: dict
    colocated_gpu: bool = False
    max_engine_restarts: int = 0
    """``ppo.max_engine_restarts``: lost engines this driver recovers before it stops the run."""
    engine_restarts: int = 0
    """Lost engines recovered so far by this driver process (all engines together)."""

    def engines(self) -> list:
        """The rollout engines' actor handles."""
        return list(self.rollout.actors)

    def training_actors(self) -> dict[tuple[str, int], Any]:
        """``(role, rank) -> handle`` of every DeepSpeed actor: ranks of torch.distributed worlds, which
        cannot be restarted one by one (a lost one stops the run)."""
        groups = {
            "policy": self.policy,
            "critic": self.critic,
            "reference": self.reference,
            "reward": self.reward,
        }
        return {(role, rank): a for role, group in groups.items() for rank, a in enumerate(group.actors)}

    def shutdown(self) -> None:
        """Kill every actor, then free the placement groups."""
        from cluster.placement import release

        for group in (self.rollout, self.policy, self.critic, self.reference, self.reward):
            group.kill()
        release(self.placements)


ENGINE_RESTART_TIMEOUT_S = 900.0
"""How long the driver waits for a restarted vLLM engine to answer (start-up took 12-72 s on 2 CPU cores)."""


class ActorLost(Exception):
    """An actor the run cannot do without is gone: ``role``/``rank`` name it, ``detail`` says how."""

    def __init__(self, role: str, rank: int, detail: str):
        super().__init__(f"{'rollout engine' if role == 'rollout' else role + ' rank'} {rank} {detail}")
        self.role, self.rank, self.detail = role, rank, detail


def with_engine_recovery(roles: Roles, phase: str, call, push_first: bool = True):
    """``call()`` (one phase's calls to the engines and its ``ray.get``); if a rollout engine was lost on
    the way, wait for Ray's restart, push the current policy weights into the engines (a restarted engine
    loaded the SFT weights from disk) and run ``call()`` again, the whole phase with the same seeds.

    ``push_first=False`` when ``call`` is itself the weight push. Raises :class:`ActorLost` past
    ``ppo.max_engine_restarts`` or when the engine does not come back.
    """
    from ray.exceptions import RayActorError

    from cluster.liveness import lost_actor_id

    stale = False
    while True:
        try:
            if stale and push_first:
                push_policy_weights(roles)
            return call()
        except RayActorError as err:
            rank = roles.rollout.rank_of(lost_actor_id(err))
            if rank is None:
                raise
            recover_engine(roles, rank, phase)
            stale = True


def recover_engine(roles: Roles, rank: int, phase: str) -> None:
    """Count the loss of engine ``rank`` against the budget and wait until its restart answers."""
    from cluster.liveness import ActorGone, wait_until_alive

    roles.engine_restarts += 1
    budget = roles.max_engine_restarts
    if roles.engine_restarts > budget:
        raise ActorLost(
            "rollout", rank, f"was lost during {phase} with ppo.max_engine_restarts={budget} used up"
        )
    print(
        f"ppo: rollout engine {rank} lost during {phase}; restart {roles.engine_restarts}/{budget}: waiting "
        "for it, then pushing the current policy weights and retrying the phase",
        flush=True,
    )
    engine = roles.engines()[rank]
    try:
        wait_until_alive(lambda: engine.health.remote(), ENGINE_RESTART_TIMEOUT_S)
    except ActorGone as err:
        raise ActorLost("rollout", rank, f"was lost during {phase} and did not come back: {err}") from None


def push_policy_weights(roles: Roles) -> dict:
    """The gathered policy weights into every engine (collective over the policy ranks); rank 0's stats."""
    import ray

    engines = roles.engines()
    return ray.get(roles.policy.map(lambda a, _r: a.sync_weights.remote(engines)))[0]


def lost_actor(roles: Roles, err: BaseException) -> ActorLost | None:
    """The actor whose loss ``err`` comes from, if the run lost one (else None: an ordinary error).

    A lost rank of a torch.distributed world can surface as its own ``ActorDiedError`` or as a collective
    error in a surviving rank (``RayTaskError``); the latter is resolved by probing every training actor.
    """
    from ray.exceptions import RayError

    from cluster.liveness import actor_id_of, lost_actor_id, probe_dead

    if isinstance(err, ActorLost):
        return err
    if not isinstance(err, RayError):
        return None
    actors = roles.training_actors()
    actor_id = lost_actor_id(err)
    found = [key for key, handle in actors.items() if actor_id and actor_id_of(handle) == actor_id]
    dead = found or probe_dead(actors)
    if not dead:
        return None
    role, rank = dead[0]
    return ActorLost(role, rank, "died (its process is gone)")


def stop_message(lost: ActorLost, checkpoints: Path, completed: int) -> str:
    """The one line a stopped run prints: what was lost, after how many iterations, where a rerun of the
    same command resumes from."""
    found = complete_checkpoints(checkpoints)
    resume = resume_hint(found[-1] if found else None)
    return f"{lost} after iteration {completed}; every actor was stopped; {resume}"


def role_requests(cfg: Config) -> dict[str, RoleRequest]:
    """What each role asks of the cluster: ``ppo.*_workers`` ranks, ``rollout.num_engines`` engines of
    ``rollout.tensor_parallel_size`` GPUs each."""
    p = cfg.ppo
    return {
        "policy": RoleRequest(p.policy_workers),
        "critic": RoleRequest(p.critic_workers),
        "reference": RoleRequest(p.reference_workers),
        "reward": RoleRequest(p.reward_workers),
        "rollout": RoleRequest(cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size),
    }


def ppo_bundles(cfg: Config, gpu: bool) -> dict[str, list[dict]]:
    """One resource bundle per actor of every role (:func:`cluster.resources.role_bundles`)."""
    return role_bundles(
        role_requests(cfg),
        gpu=gpu,
        placement=cfg.cluster.placement,
        cpus_per_actor=cfg.cluster.cpus_per_actor,
    )


def role_classes() -> dict[str, type]:
    """The DeepSpeed roles and their actor classes (imported here: they pull in Ray and DeepSpeed)."""
    from actors.critic import CriticWorker
    from actors.policy import PolicyWorker
    from actors.reference import ReferenceWorker
    from actors.reward import RewardWorker

    return {
        "policy": PolicyWorker,
        "critic": CriticWorker,
        "reference": ReferenceWorker,
        "reward": RewardWorker,
    }


def start_roles(cfg: Config, device: str, run_name: str) -> Roles:
    """Place every role, start its actors, form the torch.distributed worlds, build the engines.

    The vLLM engines start first (the slowest to come up) and load in the background while the
    DeepSpeed ranks build; one ``ray.get`` waits for everything. A failed start kills what it started
    and frees the placement groups before re-raising.
    """
    import ray

    from actors.rollout import RolloutEngine
    from cluster.actor_group import ActorGroup, default_backend
    from cluster.faults import fault_env
    from cluster.placement import place_roles, release

    gpu = device == "cuda"
    colocated = cfg.cluster.placement == "colocated"
    placements = place_roles(
        ppo_bundles(cfg, gpu), colocated=colocated, timeout_s=cfg.cluster.placement_timeout_s, name=run_name
    )
    threads, specs = cfg.cluster.torch_threads, role_specs(cfg, device)
    started: dict = {}
    try:
        started["rollout"] = ActorGroup(
            RolloutEngine,
            placements["rollout"],
            run_name=run_name,
            init_args=(str(Path(cfg.model.path).resolve()),),
            init_kwargs=rollout_kwargs(cfg, device),
            rank_kwargs=lambda rank: {"seed": derived_seed(cfg.ppo.seed, 10_000 + rank)},
            torch_threads=threads,
            env=fault_env(),  # RLHF_FAULT_*: test fault injection (cluster/faults.py); empty otherwise
            max_restarts=cfg.ppo.max_engine_restarts,
        )
        classes = role_classes()
        for role, cls in classes.items():
            started[role] = ActorGroup(
                cls,
                placements[role],
                run_name=run_name,
                init_kwargs={"spec": specs[role]},
                torch_threads=threads,
            )
        for role in classes:
            started[role].init_world(default_backend(gpu))
        ray.get([ref for role in classes for ref in started[role].map(lambda a, _r: a.build.remote())])
        ray.get([a.health.remote() for a in started["rollout"].actors])
    except BaseException:
        for group in started.values():  # leave no actors or reserved resources behind
            group.kill()
        release(placements)
        raise
    return Roles(
        **started,
        placements=placements,
        colocated_gpu=gpu and colocated,
        max_engine_restarts=cfg.ppo.max_engine_restarts,
    )


def check_resources(cfg: Config) -> str:
    """Connect to Ray and fail with one line naming the role if the request can never be met;
    returns the device (``'cpu'``/``'cuda'``)."""
    from cluster.connect import connect
    from cluster.resources import check_feasible, detect_resources, use_gpu

    connect(cfg.cluster.ray_address, cfg.cluster.num_cpus, cfg.cluster.torch_threads)
    resources = detect_resources()
    gpu = use_gpu(cfg.cluster.device, resources)
    check_feasible(ppo_bundles(cfg, gpu), resources, colocated=cfg.cluster.placement == "colocated")
    return "cuda" if gpu else "cpu"


# --------------------------------------------------------------------------------------------------
# One iteration, phase by phase
# --------------------------------------------------------------------------------------------------


def generate(roles: Roles, cfg: Config, data: RunData, state: DriverState) -> dict[str, torch.Tensor]:
    """Phase 1: this iteration's prompts, split over the engines (own seed each, PPO_DETAILS 6), n samples
    per prompt; returns the rollout batch (:func:`build_rollout_batch`, vLLM log-probs included). A lost
    engine is restarted and the phase retried (:func:`with_engine_recovery`)."""
    import ray

    rows = take_rows(state.prompt_position, cfg.ppo.prompts_per_iteration, len(data.prompts), cfg.ppo.seed)
    prompts = [data.prompts[i] for i in rows]
    r = cfg.rollout
    sampling = {
        "n": cfg.ppo.samples_per_prompt,
        "max_new_tokens": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
    }
    engines = roles.engines()
    bounds = contiguous_bounds(len(prompts), len(engines))

    def sample() -> list[dict]:
        refs = [
            engine.generate.remote(prompts[lo:hi], sampling, derived_seed(cfg.ppo.seed, state.iteration, e))
            for e, (engine, (lo, hi)) in enumerate(zip(engines, bounds))
            if hi > lo
        ]
        return [s for part in ray.get(refs) for s in part]  # prompt-major, engine order = prompt order

    # A lost engine: the whole phase again with the same seeds, so the samples equal an uninterrupted run's.
    samples = with_engine_recovery(roles, f"generate of iteration {state.iteration + 1}", sample)
    repeated = [p for p in prompts for _ in range(cfg.ppo.samples_per_prompt)]
    return build_rollout_batch(
        repeated,
        [s["token_ids"] for s in samples],
        data.pad_id,
        data.eos_id,
        [s["logprobs"] for s in samples],
    )


def put_shards(batch: dict[str, torch.Tensor], world: int, cache: dict) -> list:
    """ObjectRefs of the token tensors split into ``world`` equal shards (one ``ray.put`` per shard,
    shared by every group with the same world size through ``cache``)."""
    import ray

    if world not in cache:
        tokens = {k: batch[k] for k in ("sequences", "attention_mask", "response_mask")}
        cache[world] = (equal_shards(tokens["sequences"].shape[0], world), [])
        for shard in cache[world][0]:
            cache[world][1].append(ray.put(select_rows(tokens, shard.indices)))
    return cache[world][1]


def make_experience(roles: Roles, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phase 2a: old log-probs (policy's training engine), reference log-probs, RM scores and values, all
    in flight together, one ``ray.get``; returns them whole-batch (padding rows of shards dropped)."""
    import ray

    cache: dict = {}
    calls = {
        "old_logprobs": (roles.policy, lambda a, s: a.logprobs.remote(s)),
        "ref_logprobs": (roles.reference, lambda a, s: a.logprobs.remote(s)),
        "scores": (roles.reward, lambda a, s: a.scores.remote(s)),
        "values": (roles.critic, lambda a, s: a.values.remote(s)),
    }
    refs = {}
    for name, (group, call) in calls.items():
        shards = put_shards(batch, len(group), cache)
        refs[name] = [call(actor, shard) for actor, shard in zip(group.actors, shards)]
    flat = ray.get([r for rs in refs.values() for r in rs])
    out, pos = {}, 0
    for name, (group, _) in calls.items():
        parts = flat[pos : pos + len(group)]
        pos += len(group)
        out[name] = unshard(parts, cache[len(group)][0])
    return out


def train_plans(cfg: Config, data: RunData, state: DriverState, response_mask: torch.Tensor) -> dict:
    """Phase 3 inputs: minibatches of every PPO epoch, each rank's micro-batches, global token counts,
    and (with ptx) each policy rank's pretraining micro-batches; advances ``state.ptx_position``."""
    p = cfg.ppo
    perms = epoch_permutations(response_mask.shape[0], p.ppo_epochs, p.seed, state.iteration)
    steps = minibatches(perms, p.mini_batch_size)
    plans = {
        "steps": len(steps),
        "step_tokens": step_token_counts(response_mask, steps),
        "policy": rank_plan(steps, p.policy_workers, p.micro_batch_size),
        "critic": rank_plan(steps, p.critic_workers, p.micro_batch_size),
        "ptx": None,
        "ptx_tokens": None,
    }
    if p.ptx_coef > 0:
        per_step = p.policy_workers * p.ptx_batch_size
        micro_steps = p.mini_batch_size // (p.micro_batch_size * p.policy_workers)
        ptx_by_rank: list[list] = [[] for _ in range(p.policy_workers)]
        tokens = []
        for _ in steps:
            rows = take_rows(state.ptx_position, per_step, len(data.ptx), derived_seed(p.seed, 1))
            state.ptx_position += per_step
            layout, count = ptx_plan([data.ptx[i] for i in rows], p.policy_workers, micro_steps, data.pad_id)
            for rank, slots in enumerate(layout):
                ptx_by_rank[rank].append(slots)
            tokens.append(count)
        plans["ptx"], plans["ptx_tokens"] = ptx_by_rank, tokens
    return plans


def train(
    roles: Roles, experience: dict[str, torch.Tensor], plans: dict, poison: dict[str, list[int]] | None = None
) -> tuple[dict[str, float], dict[str, list[bool]]]:
    """Phase 3: policy and critic train in parallel on the same minibatches (one ``ray.get``).

    Returns the metrics and, per role, which optimizer steps were skipped (non-finite loss or gradient
    norm). ``poison``: per role, step indices to make non-finite (fault injection, :func:`fault_poison`).
    """
    import ray

    poison = poison or {}
    exp_ref = ray.put(experience)
    policy_refs = roles.policy.map(
        lambda a, r: a.train.remote(
            exp_ref,
            plans["policy"][r],
            plans["ptx"][r] if plans["ptx"] else None,
            plans["step_tokens"],
            plans["ptx_tokens"],
            poison.get("policy", []),
        )
    )
    critic_refs = roles.critic.map(
        lambda a, r: a.train.remote(
            exp_ref, plans["critic"][r], plans["step_tokens"], poison.get("critic", [])
        )
    )
    results = ray.get(policy_refs + critic_refs)
    policy_steps = sum_over_ranks(results[: len(policy_refs)])
    critic_steps = sum_over_ranks(results[len(policy_refs) :])
    skipped = {
        "policy": [bool(s.get("skipped")) for s in policy_steps],
        "critic": [bool(s.get("skipped")) for s in critic_steps],
    }
    return policy_metrics(policy_steps, plans["ptx_tokens"]) | critic_metrics(critic_steps), skipped


def fault_poison(iteration: int, steps: int) -> dict[str, list[int]]:
    """Fault injection for tests (``trainers.runtime.nonfinite``): per role, the indices of this iteration's
    optimizer steps that ``RLHF_FAULT_NONFINITE_STEPS`` poisons (steps counted over the run, 1-based);
    prints a line when any is armed."""
    from cluster.faults import NONFINITE_ENV, injector

    faults = injector()
    out = {role: faults.nonfinite_in(role, iteration * steps + 1, steps) for role in ("policy", "critic")}
    for role, idx in out.items():
        if idx:
            print(
                f"ppo: {NONFINITE_ENV} poisons {role} steps {[iteration * steps + i + 1 for i in idx]}",
                flush=True,
            )
    return out


def check_nonfinite(
    state: DriverState, skipped: dict[str, list[bool]], limit: int, checkpoints: Path
) -> None:
    """Carry each role's streak of skipped optimizer steps through this iteration (``state``), print a line
    when steps were skipped, and raise :class:`RunStopped` once a role has ``limit`` in a row -- before
    anything of this iteration is saved. The message names the newest complete checkpoint under
    ``checkpoints``."""
    from trainers.runtime.nonfinite import stop_message, update_streak

    longest = {}
    for role, flags in skipped.items():
        state.nonfinite_streak[role], longest[role] = update_streak(
            state.nonfinite_streak.get(role, 0), flags
        )
        if any(flags):
            print(
                f"ppo: iteration {state.iteration + 1}: {role} skipped {sum(flags)} of {len(flags)} optimizer "
                f"steps (non-finite loss or gradient; {state.nonfinite_streak[role]} in a row, stop at {limit})",
                flush=True,
            )
    worst = max(longest, key=lambda role: longest[role])
    if longest[worst] >= limit:
        found = complete_checkpoints(checkpoints)
        resume = resume_hint(found[-1] if found else None)
        what = f"ppo iteration {state.iteration + 1}, {worst}"
        raise RunStopped(stop_message(what, longest[worst], limit, resume))


def sync_weights(roles: Roles) -> dict[str, float]:
    """Phase 4: gathered policy weights into every vLLM engine (collective over the policy ranks); an
    engine lost on the way is restarted and the push repeated (:func:`with_engine_recovery`)."""
    import ray

    engines = roles.engines()
    if roles.colocated_gpu:
        ray.get([e.wake_up.remote(["weights"]) for e in engines])
    stats = with_engine_recovery(roles, "weight sync", lambda: push_policy_weights(roles), push_first=False)
    if roles.colocated_gpu:
        ray.get([e.wake_up.remote(["kv_cache"]) for e in engines])
    return {"sync/bytes": float(stats["bytes"]), "sync/buckets": float(stats["buckets"])}


def run_iteration(
    roles: Roles, cfg: Config, data: RunData, state: DriverState, kl_ctl, checkpoints: Path
) -> dict[str, float]:
    """One PPO-ptx iteration (module docstring); advances ``state``; returns its metrics.

    Raises :class:`RunStopped` (naming the newest complete checkpoint under ``checkpoints``) when
    ``ppo.max_nonfinite_steps`` optimizer steps in a row of the policy or the critic were skipped.
    """
    import ray

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    batch = generate(roles, cfg, data, state)
    state.prompt_position += cfg.ppo.prompts_per_iteration
    timings["timing/generate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if roles.colocated_gpu:
        ray.get([e.sleep.remote() for e in roles.engines()])
    mask = batch["response_mask"]
    passes = make_experience(roles, batch)
    kl_coef = kl_ctl.value
    exp = compute_advantages(
        mask,
        passes["old_logprobs"],
        passes["ref_logprobs"],
        passes["scores"],
        passes["values"],
        kl_coef,
        cfg.ppo.kl_estimator,
        cfg.ppo.gamma,
        cfg.ppo.lam,
        cfg.reward.score_clip,
    )
    metrics = rollout_metrics(batch, data.eos_id, passes["old_logprobs"], passes["ref_logprobs"])
    metrics |= objective_metrics(exp, passes["scores"], mask, kl_coef)
    timings["timing/experience"] = time.perf_counter() - clock

    clock = time.perf_counter()
    experience = {k: batch[k] for k in ("sequences", "attention_mask", "response_mask")}
    experience |= {
        "old_logprobs": passes["old_logprobs"],
        "advantages": exp["advantages"],
        "values": exp["values"],
        "returns": exp["returns"],
    }
    plans = train_plans(cfg, data, state, mask)
    train_metrics, skipped = train(roles, experience, plans, fault_poison(state.iteration, plans["steps"]))
    metrics |= train_metrics
    check_nonfinite(state, skipped, cfg.ppo.max_nonfinite_steps, checkpoints)
    timings["timing/train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    metrics |= sync_weights(roles)
    timings["timing/sync"] = time.perf_counter() - clock

    kl_ctl.update(metrics["objective/kl"], int(mask.shape[0]))
    state.iteration += 1
    state.kl_controller = kl_ctl.state_dict()
    return metrics | timings


def save_checkpoint(roles: Roles, root: Path, state: DriverState, keep: int) -> Path:
    """``root/iter_NNNNNN``: policy and critic DeepSpeed states (every rank writes its part) and the
    driver state, written under ``.tmp`` and renamed when complete; older ones rotated away."""
    import ray

    final = root / checkpoint_name(state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get(
        roles.policy.map(lambda a, _r: a.save_state.remote(str(tmp / "policy")))
        + roles.critic.map(lambda a, _r: a.save_state.remote(str(tmp / "critic")))
    )
    atomic_write_json(tmp / STATE_FILE, dataclasses.asdict(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate_checkpoints(root, keep)
    return final


def load_checkpoint(roles: Roles, path: Path) -> DriverState:
    """Restore policy and critic engines (weights, AdamW, schedule) and the driver state from ``path``."""
    import ray

    ray.get(
        roles.policy.map(lambda a, _r: a.load_state.remote(str(path / "policy")))
        + roles.critic.map(lambda a, _r: a.load_state.remote(str(path / "critic")))
    )
    return DriverState(**json.loads((path / STATE_FILE).read_text()))


def _progress(it: int, total: int, m: dict[str, float]) -> str:
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


def summarize(records: list[dict], state: DriverState, wall: float, out: Path, resumed_from: int) -> dict:
    """``summary.json``: the last iteration's metrics, the mean score of the first and last quarter of the
    run (did the policy improve against the RM?), wall time and where the model is."""
    summary = {f"ppo/{k}": v for k, v in records[-1].items() if k != "step"} if records else {}
    scores = [r["objective/score"] for r in records if "objective/score" in r]
    if scores:
        q = max(1, len(scores) // 4)
        summary["ppo/score_first_quarter"] = sum(scores[:q]) / q
        summary["ppo/score_last_quarter"] = sum(scores[-q:]) / q
    summary |= {
        "ppo/iterations": state.iteration,
        "ppo/resumed_from_iteration": resumed_from,
        "ppo/wall_time_s": round(wall, 2),
        "model_dir": str(out / "model"),
    }
    return summary


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def iterate(roles: Roles, cfg: Config, data: RunData, state: DriverState, kl_ctl, writer, out: Path) -> None:
    """The remaining iterations: run, log (with ``rollout/engine_restarts``, the engines lost and recovered
    during the iteration), print progress, checkpoint every ``ppo.checkpoint_every`` and at the end."""
    p = cfg.ppo
    while state.iteration < p.iterations:
        restarts = roles.engine_restarts
        metrics = run_iteration(roles, cfg, data, state, kl_ctl, checkpoints=out / "checkpoints")
        metrics["rollout/engine_restarts"] = float(roles.engine_restarts - restarts)
        writer.log(state.iteration, metrics)
        if cfg.logging.progress and (state.iteration % cfg.logging.log_every == 0 or state.iteration == 1):
            print(_progress(state.iteration, p.iterations, metrics), flush=True)
        every = p.checkpoint_every
        if (every and state.iteration % every == 0) or state.iteration == p.iterations:
            save_checkpoint(roles, out / "checkpoints", state, p.keep_checkpoints)


def run_ppo(cfg: Config, out_dir: str | os.PathLike, fresh: bool = False) -> dict:
    """Validate, start the actors, resume from the newest complete checkpoint (unless ``fresh``), run
    the remaining iterations, save the policy to ``OUT/model`` and ``OUT/summary.json``; return the
    summary. User errors (config, data, models, impossible resources) raise before anything is written.
    """
    import ray

    start = time.time()
    out, data = validate_run(cfg, out_dir)
    found = [] if fresh else complete_checkpoints(out / "checkpoints")
    check_resumable(found[-1] if found else None, cfg)
    device = check_resources(cfg)
    prepare_output(out, dump_yaml(cfg), fresh)
    p = cfg.ppo
    clock = time.perf_counter()
    roles = start_roles(cfg, device, run_name=f"ppo-{uuid.uuid4().hex[:6]}")
    print(f"ppo: actors ready in {time.perf_counter() - clock:.1f}s", flush=True)
    kl_ctl = algos.make_kl_controller(
        "adaptive" if p.adaptive_kl else "fixed", p.kl_coef, p.kl_target, p.kl_horizon
    )
    state, resumed_from = DriverState(kl_controller=kl_ctl.state_dict(), shape=run_shape(cfg)), 0
    writer = None
    try:
        if found:
            state = load_checkpoint(roles, found[-1])
            kl_ctl.load_state_dict(state.kl_controller)
            resumed_from = state.iteration
            sync_weights(roles)  # the engines started from the SFT weights
            print(f"ppo: resumed from {found[-1]} (iteration {state.iteration})", flush=True)
        truncate_metrics(out / "metrics.jsonl", state.iteration)  # before the writer opens the file
        writer = MetricsWriter(out, prefix="ppo", sinks=open_sinks(out, cfg.logging, to_dict(cfg)))
        iterate(roles, cfg, data, state, kl_ctl, writer, out)
        ray.get(roles.policy.map(lambda a, _r: a.save_model.remote(str(out / "model"))))
        summary = summarize(
            read_metrics(out / "metrics.jsonl"), state, time.time() - start, out, resumed_from
        )
        atomic_write_json(out / "summary.json", summary)
        print(f"ppo: done in {summary['ppo/wall_time_s']:.1f}s; policy in {out / 'model'}", flush=True)
        return summary
    except Exception as err:
        # A lost actor the run cannot replace: one line, every actor stopped (finally), resumable.
        lost = lost_actor(roles, err)
        if lost is None:
            raise
        raise RunStopped(stop_message(lost, out / "checkpoints", state.iteration)) from err
    finally:
        if writer is not None:
            writer.close()
        roles.shutdown()
