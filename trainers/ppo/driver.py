"""PPO-ptx driver: one controller process that moves token ids and small per-token tensors between
Ray actor groups (policy, critic, reference, reward, vLLM rollout) and does the cheap maths itself.

    rlhf ppo --config trainers/configs/tiny.yaml --out /tmp/ppo \\
        data.dir=/tmp/world model.path=/tmp/sft/model reward.path=/tmp/rm/model

One iteration (docs/design.md, "PPO-ptx data flow"):

1. generate   (:func:`sample_rollouts`) prompts -> vLLM engines (n samples each, a seed per engine and
              iteration, the run's stop ids) -> responses cut after their first stop id, finish
              reasons kept (truncated responses);
2. experience (:func:`make_experience`) old log-probs (the trained policy), reference log-probs, RM
              scores, values, all in flight together; then (missing-stop penalty) -> KL -> shaped
              rewards -> GAE -> advantages whitened over the batch;
3. train      (:func:`train`) ppo_epochs x freshly shuffled minibatches, one optimizer step each; policy
              (PPO clip + ptx_coef x LM loss on pretraining text) and critic (clipped value loss) in
              parallel;
4. sync       (:func:`sync_weights`) gathered policy weights -> every vLLM engine;
5. KL controller update, metrics, checkpoint.

The package, one file per seam: ``schedule`` (seeds, rows, permutations, rank plans), ``batch`` (rollout
batches), ``experience`` (advantages), ``metrics``, ``checkpoint``, ``setup`` (validation, what each role is
given), ``roles`` (the actor groups), ``recovery`` (lost actors, non-finite streaks) and this module: the
phases and the loop.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray

from trainers import algos
from trainers.config import Config, dump_yaml, to_dict
from trainers.data.sharding import Shard, contiguous_bounds, equal_shards, unshard
from trainers.errors import RunStopped
from trainers.files import atomic_write_json
from trainers.ppo.batch import Experience, Rollout, TokenBatch, build_rollout_batch
from trainers.ppo.checkpoint import (
    DriverState,
    check_resumable,
    load_checkpoint,
    resume_point,
    run_shape,
    save_checkpoint,
)
from trainers.ppo.experience import ExperiencePasses, build_experience, compute_advantages
from trainers.ppo.metrics import (
    critic_metrics,
    iteration_line,
    objective_metrics,
    policy_metrics,
    rollout_metrics,
    sum_over_ranks,
    summarize,
)
from trainers.ppo.recovery import (
    announce_poisoned_steps,
    check_nonfinite,
    lost_actor,
    lost_actor_message,
    with_engine_recovery,
)
from trainers.ppo.roles import Roles, check_resources, push_policy_weights, start_roles
from trainers.ppo.schedule import TrainPlan, derived_seed, plan_training, take_rows
from trainers.ppo.setup import RunData, validate_run
from trainers.runs.metrics import MetricsWriter, read_metrics, truncate_metrics
from trainers.runs.outdir import prepare_output
from trainers.runs.sinks import open_sinks


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Wall time of the block as ``timings["timing/<phase>"]`` (not recorded if the block raises)."""
    clock = time.perf_counter()
    yield
    timings[f"timing/{phase}"] = time.perf_counter() - clock


def sample_rollouts(roles: Roles, cfg: Config, data: RunData, state: DriverState) -> Rollout:
    """Phase 1: this iteration's prompts, split over the engines (own seed each, docs/ppo_details.md item 6),
    n samples per prompt; returns the rollout (:func:`trainers.ppo.batch.build_rollout_batch`: cut at
    ``data.stop_ids``, vLLM log-probs and finish reasons included). A lost engine is restarted and the phase
    retried (:func:`with_engine_recovery`): the same seeds give the same samples and finish reasons."""
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
        data.stop_ids,
        [s["logprobs"] for s in samples],
        [s["finish_reason"] for s in samples],
    )


def score_rollout(roles: Roles, tokens: TokenBatch) -> ExperiencePasses:
    """Phase 2a: old log-probs (the trained policy), reference log-probs, RM scores and values, all
    in flight together, one ``ray.get``; returned whole-batch (padding rows of the shards dropped).

    Each group gets ``tokens`` in equal shards, one per rank (ZeRO-3 lock-step); groups of the same size
    share the shards' ``ray.put``."""
    groups = {
        "old_logprobs": (roles.policy, lambda a, s: a.logprobs.remote(s)),
        "ref_logprobs": (roles.reference, lambda a, s: a.logprobs.remote(s)),
        "scores": (roles.reward, lambda a, s: a.scores.remote(s)),
        "values": (roles.critic, lambda a, s: a.values.remote(s)),
    }
    shards: dict[int, tuple[list[Shard], list[ray.ObjectRef]]] = {}
    refs = []
    for group, call in groups.values():
        if len(group) not in shards:
            split = equal_shards(len(tokens), len(group))
            shards[len(group)] = (split, [ray.put(tokens.rows(shard.indices)) for shard in split])
        refs += [call(actor, ref) for actor, ref in zip(group.actors, shards[len(group)][1])]
    flat, out, pos = ray.get(refs), {}, 0
    for name, (group, _) in groups.items():
        out[name] = unshard(flat[pos : pos + len(group)], shards[len(group)][0])
        pos += len(group)
    return ExperiencePasses(**out)


def make_experience(
    roles: Roles, cfg: Config, rollout: Rollout, stop_ids: tuple[int, ...], kl_coef: float
) -> tuple[Experience, dict[str, float]]:
    """Phase 2: the passes over the rollout (:func:`score_rollout`), then the score clip and the
    missing-stop penalty (``reward.missing_eos_penalty`` on truncated responses, docs/ppo_details.md item
    29) -> KL -> shaped rewards -> GAE -> whitened advantages
    (:func:`trainers.ppo.experience.compute_advantages`); returns what the training actors get and the
    rollout and objective metrics (``objective/score`` stays the raw RM score)."""
    if roles.colocated_gpu:
        ray.get([e.sleep.remote() for e in roles.engines()])
    mask = rollout.tokens.response_mask
    passes = score_rollout(roles, rollout.tokens)
    p = cfg.ppo
    adv = compute_advantages(
        mask,
        passes,
        kl_coef,
        p.kl_estimator,
        p.gamma,
        p.lam,
        cfg.reward.score_clip,
        truncated=rollout.truncated,
        missing_eos_penalty=cfg.reward.missing_eos_penalty,
    )
    metrics = rollout_metrics(rollout, stop_ids, passes.old_logprobs, passes.ref_logprobs)
    metrics |= objective_metrics(adv, passes.scores, mask, kl_coef)
    return build_experience(rollout.tokens, passes, adv), metrics


def train(
    roles: Roles, experience: Experience, plan: TrainPlan
) -> tuple[dict[str, float], dict[str, list[bool]]]:
    """Phase 3: policy and critic train in parallel on the same minibatches (one ``ray.get``).

    Returns the metrics and, per role, which optimizer steps were skipped (non-finite loss or gradient
    norm)."""
    exp_ref = ray.put(experience)
    policy_refs = roles.policy.map(lambda a, r: a.train.remote(exp_ref, plan.policy[r]))
    critic_refs = roles.critic.map(lambda a, r: a.train.remote(exp_ref, plan.critic[r]))
    results = ray.get(policy_refs + critic_refs)
    policy_steps = sum_over_ranks(results[: len(policy_refs)])
    critic_steps = sum_over_ranks(results[len(policy_refs) :])
    skipped = {
        "policy": [bool(s.get("skipped")) for s in policy_steps],
        "critic": [bool(s.get("skipped")) for s in critic_steps],
    }
    return policy_metrics(policy_steps, plan.ptx_tokens) | critic_metrics(critic_steps), skipped


def sync_weights(roles: Roles) -> dict[str, float]:
    """Phase 4: gathered policy weights into every vLLM engine (collective over the policy ranks); an
    engine lost on the way is restarted and the push repeated (:func:`with_engine_recovery`)."""
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
    """One PPO-ptx iteration (module docstring), phase by phase; advances ``state``; returns its metrics.

    Raises :class:`RunStopped` (naming the newest complete checkpoint under ``checkpoints``) when
    ``ppo.max_nonfinite_steps`` optimizer steps in a row of the policy or the critic were skipped.
    """
    timings: dict[str, float] = {}
    with timed(timings, "generate"):
        rollout = sample_rollouts(roles, cfg, data, state)
        state.prompt_position += cfg.ppo.prompts_per_iteration
    with timed(timings, "experience"):
        experience, metrics = make_experience(roles, cfg, rollout, data.stop_ids, kl_ctl.value)
    with timed(timings, "train"):
        plan = plan_training(
            cfg.ppo,
            state.iteration,
            experience.tokens.response_mask,
            data.ptx,
            state.ptx_position,
            data.pad_id,
        )
        state.ptx_position += plan.ptx_rows
        announce_poisoned_steps(plan.first_step, len(plan.minibatches))
        train_metrics, skipped = train(roles, experience, plan)
        metrics |= train_metrics
        check_nonfinite(state, skipped, cfg.ppo.max_nonfinite_steps, checkpoints)
    with timed(timings, "sync"):
        metrics |= sync_weights(roles)
    kl_ctl.update(metrics["objective/kl"], len(rollout))
    state.iteration += 1
    state.kl_controller = kl_ctl.state_dict()
    return metrics | timings


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
            print(iteration_line(state.iteration, p.iterations, metrics), flush=True)
        every = p.checkpoint_every
        if (every and state.iteration % every == 0) or state.iteration == p.iterations:
            save_checkpoint(roles, out / "checkpoints", state, p.keep_checkpoints)


def run_ppo(cfg: Config, out_dir: str | os.PathLike, fresh: bool = False) -> dict:
    """Validate, start the actors, resume from the newest complete checkpoint (unless ``fresh``), run
    the remaining iterations, save the policy to ``OUT/model`` and ``OUT/summary.json``; return the
    summary. User errors (config, data, models, impossible resources) raise before anything is written.
    """
    start = time.time()
    out, data = validate_run(cfg, out_dir)
    resume = resume_point(out / "checkpoints", fresh)
    check_resumable(resume, cfg)
    device = check_resources(cfg)
    prepare_output(out, dump_yaml(cfg), fresh)
    print(
        f"ppo: {len(data.prompts)} prompts, stop ids {list(data.stop_ids)}, pad id {data.pad_id}", flush=True
    )
    p = cfg.ppo
    clock = time.perf_counter()
    roles = start_roles(cfg, device, run_name=f"ppo-{uuid.uuid4().hex[:6]}", stop_ids=data.stop_ids)
    print(f"ppo: actors ready in {time.perf_counter() - clock:.1f}s", flush=True)
    kl_ctl = algos.make_kl_controller(
        "adaptive" if p.adaptive_kl else "fixed", p.kl_coef, p.kl_target, p.kl_horizon
    )
    state, resumed_from = DriverState(kl_controller=kl_ctl.state_dict(), shape=run_shape(cfg)), 0
    writer = None
    try:
        if resume is not None:
            state = load_checkpoint(roles, resume)
            kl_ctl.load_state_dict(state.kl_controller)
            resumed_from = state.iteration
            sync_weights(roles)  # the engines started from the SFT weights
            print(f"ppo: resumed from {resume} (iteration {state.iteration})", flush=True)
        truncate_metrics(out / "metrics.jsonl", state.iteration)  # before the writer opens the file
        writer = MetricsWriter(out, prefix="ppo", sinks=open_sinks(out, cfg.logging, to_dict(cfg)))
        iterate(roles, cfg, data, state, kl_ctl, writer, out)
        ray.get(roles.policy.map(lambda a, _r: a.save_model.remote(str(out / "model"))))
        summary = summarize(
            read_metrics(out / "metrics.jsonl"), state.iteration, time.time() - start, out, resumed_from
        )
        if data.overlong:
            summary["data/overlong"] = data.overlong
        atomic_write_json(out / "summary.json", summary)
        print(f"ppo: done in {summary['ppo/wall_time_s']:.1f}s; policy in {out / 'model'}", flush=True)
        return summary
    except Exception as err:
        # A lost actor the run cannot replace: one line, every actor stopped (finally), resumable.
        lost = lost_actor(roles, err)
        if lost is None:
            raise
        raise RunStopped(lost_actor_message(lost, out / "checkpoints", state.iteration)) from err
    finally:
        if writer is not None:
            writer.close()
        roles.shutdown()
