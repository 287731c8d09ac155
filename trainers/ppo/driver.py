"""PPO-ptx driver: one controller process that moves token ids and small per-token tensors between
Ray actor groups (policy, critic, reference, reward, vLLM rollout) and does the cheap maths itself.

    rlhf ppo --config trainers/configs/tiny.yaml --out /tmp/ppo \\
        data.dir=/tmp/world model.path=/tmp/sft/model reward.path=/tmp/rm/model

One iteration (docs/design.md, "PPO-ptx data flow" and issue 15):

1. generate   (:func:`trainers.ppo.sampling.sample_rollouts`) prompts -> vLLM engines (n samples each, a
              seed per engine and iteration, the run's stop ids) -> responses cut after their first stop
              id, finish reasons kept; with ``ppo.dynamic_sampling`` groups without signal dropped and
              more prompts sampled;
2. experience (:func:`make_experience`) old log-probs (the trained policy), reference log-probs, the
              reward sources (RM, function, endpoint), values (GAE only), all in flight together; then
              the used score (weights, clip, missing-stop penalty, overlong shaping) -> KL ->
              ``ppo.advantage``'s advantages;
3. train      (:func:`train`) ppo_epochs x freshly shuffled minibatches, one optimizer step each; policy
              (PPO clip + KL loss term + ptx_coef x LM loss on pretraining text, aggregated by
              ``ppo.loss_agg``) and, with GAE, critic (clipped value loss) in parallel;
4. sync       (:func:`sync_weights`) gathered policy weights -> every vLLM engine;
   with colocated GPU placement the engines sleep through 2 and 3 and wake around 4
   (:mod:`trainers.ppo.colocation`);
5. KL controller update, evaluation every ``ppo.eval_every`` (:mod:`trainers.ppo.evaluate`), metrics,
   checkpoint.

The package, one file per seam: ``schedule`` (seeds, rows, permutations, rank plans), ``batch`` (rollout
batches), ``sampling`` (the generate phase), ``scoring`` (the no-grad passes, the reward sources),
``experience`` (advantages), ``evaluate``, ``metrics``, ``checkpoint``, ``setup`` (validation, what each
role is given), ``roles`` (the actor groups), ``recovery`` (lost actors, non-finite streaks), ``colocation``
(the engines' sleep and wake) and this module: the phases and the loop.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray
import torch

from cluster.placement import placement_lines
from trainers import algos
from trainers.config import Config, dump_yaml, to_dict
from trainers.errors import RunStopped
from trainers.files import atomic_write_json
from trainers.ppo.batch import Experience, Rollout
from trainers.ppo.checkpoint import (
    DriverState,
    check_resumable,
    load_checkpoint,
    resume_point,
    run_shape,
    save_checkpoint,
)
from trainers.ppo.colocation import EngineMemory
from trainers.ppo.evaluate import evaluate
from trainers.ppo.experience import (
    ExperiencePasses,
    build_experience,
    compute_advantages,
    used_scores,
)
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
from trainers.ppo.sampling import Sampled, sample_rollouts
from trainers.ppo.schedule import TrainPlan, padding_metrics, plan_training
from trainers.ppo.scoring import RewardScorer, score_rollout
from trainers.ppo.setup import RunData, objective_line, validate_run
from trainers.runs.metrics import MetricsWriter, read_metrics, truncate_metrics
from trainers.runs.outdir import prepare_output
from trainers.runs.sinks import open_sinks


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Wall time of the block as ``timings["timing/<phase>"]`` (not recorded if the block raises)."""
    clock = time.perf_counter()
    yield
    timings[f"timing/{phase}"] = time.perf_counter() - clock


def score_sources(
    roles: Roles, scorer: RewardScorer, data: RunData, rollout: Rollout, rows: Sequence[int], iteration: int
) -> dict[str, torch.Tensor]:
    """Every reward source's ``(N,)`` scores of ``rollout`` (``rows``: each row's prompt index): the text
    sources' calls first, then the RM pass, then their answers."""
    pending = scorer.submit(rollout.tokens, [data.records[i] for i in rows])
    rm = score_rollout(roles, rollout.tokens, ["rm"])["rm"] if roles.reward is not None else None
    return scorer.collect(pending, rm, iteration)


def make_experience(
    roles: Roles,
    cfg: Config,
    data: RunData,
    sampled: Sampled,
    scorer: RewardScorer,
    kl_coef: float,
    iteration: int,
) -> tuple[Experience, dict[str, float]]:
    """Phase 2: the passes over the rollout (:func:`score_rollout`) with the text sources' calls in flight,
    the sources summed (``reward.weights``) -> clip -> missing-stop penalty (docs/ppo_details.md item 29)
    -> overlong shaping -> KL -> ``ppo.advantage``'s advantages
    (:func:`trainers.ppo.experience.compute_advantages`); returns what the training actors get and the
    rollout and objective metrics (``objective/score`` is the summed score before clip and penalties)."""
    rollout, p = sampled.rollout, cfg.ppo
    mask = rollout.tokens.response_mask
    names = ["old_logprobs", "ref_logprobs"] + ["values"] * (roles.critic is not None)
    pending = None
    if sampled.scores is None:
        pending = scorer.submit(rollout.tokens, [data.records[i] for i in sampled.rows])
        names += ["rm"] * (roles.reward is not None)
    out = score_rollout(roles, rollout.tokens, names)
    sources = sampled.scores if pending is None else scorer.collect(pending, out.get("rm"), iteration)
    passes = ExperiencePasses(
        out["old_logprobs"], out["ref_logprobs"], scorer.combine(sources), out.get("values"), sources
    )
    adv = compute_advantages(
        mask,
        passes,
        kl_coef,
        p.kl_estimator,
        p.gamma,
        p.lam,
        truncated=rollout.truncated,
        estimator=p.advantage,
        group_size=p.samples_per_prompt,
        shaping=scorer.shaping,
    )
    metrics = rollout_metrics(rollout, data.stop_ids, passes.old_logprobs, passes.ref_logprobs)
    metrics |= objective_metrics(adv, passes.scores, mask, kl_coef, sources) | sampled.metrics
    return build_experience(rollout.tokens, passes, adv, with_ref=p.kl_loss_coef > 0), metrics


def train(
    roles: Roles, experience: Experience, plan: TrainPlan
) -> tuple[dict[str, float], dict[str, list[bool]]]:
    """Phase 3: policy and (with GAE) critic train in parallel on the same minibatches (one ``ray.get``).

    Returns the metrics and, per role, which optimizer steps were skipped (non-finite loss or gradient
    norm)."""
    exp_ref = ray.put(experience)
    policy_refs = roles.policy.map(lambda a, r: a.train.remote(exp_ref, plan.policy[r]))
    critic_refs = (
        roles.critic.map(lambda a, r: a.train.remote(exp_ref, plan.critic[r])) if roles.critic else []
    )
    results = ray.get(policy_refs + critic_refs)
    policy_steps = sum_over_ranks(results[: len(policy_refs)])
    metrics = policy_metrics(policy_steps, plan.ptx_tokens, plan.denominators)
    skipped = {"policy": [bool(s.get("skipped")) for s in policy_steps]}
    if critic_refs:
        critic_steps = sum_over_ranks(results[len(policy_refs) :])
        skipped["critic"] = [bool(s.get("skipped")) for s in critic_steps]
        metrics |= critic_metrics(critic_steps)
    return metrics, skipped


def sync_weights(roles: Roles, memory: EngineMemory | None = None) -> dict[str, float]:
    """Phase 4: gathered policy weights into every vLLM engine (collective over the policy ranks); an
    engine lost on the way is restarted and the push repeated (:func:`with_engine_recovery`).

    ``memory``: the engines' sleep state; asleep (colocated GPU placement) they get their weights back
    first and their KV cache after the push. None: they are awake (the start-up sync of a resumed run)."""
    memory = memory or engine_memory(roles)
    memory.wake_weights()
    stats = with_engine_recovery(roles, "weight sync", lambda: push_policy_weights(roles), push_first=False)
    memory.wake_kv_cache()
    return {"sync/bytes": float(stats["bytes"]), "sync/buckets": float(stats["buckets"])}


def engine_memory(roles: Roles) -> EngineMemory:
    """The engines' sleep state, awake; it moves only with colocated GPU placement."""
    return EngineMemory(roles.engines, roles.colocated_gpu)


def run_iteration(
    roles: Roles,
    cfg: Config,
    data: RunData,
    state: DriverState,
    kl_ctl,
    checkpoints: Path,
    scorer: RewardScorer,
    memory: EngineMemory | None = None,
) -> dict[str, float]:
    """One PPO-ptx iteration (module docstring), phase by phase; advances ``state``; returns its metrics.

    ``memory``: the engines' sleep state (awake on entry and on return; :mod:`trainers.ppo.colocation`).
    Raises :class:`RunStopped` (naming the newest complete checkpoint under ``checkpoints``) when
    ``ppo.max_nonfinite_steps`` optimizer steps in a row of the policy or the critic were skipped.
    """
    timings: dict[str, float] = {}
    it = state.iteration + 1
    memory = memory or engine_memory(roles)

    def score(rollout: Rollout, rows: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        sources = score_sources(roles, scorer, data, rollout, rows, it)
        used, _ = used_scores(
            scorer.combine(sources), rollout.tokens.response_mask, scorer.shaping, rollout.truncated
        )
        return sources, used

    with timed(timings, "generate"):
        memory.require_awake("generation")
        sampled = sample_rollouts(roles, cfg, data, state, score)
    with timed(timings, "experience"):
        memory.sleep()
        experience, metrics = make_experience(roles, cfg, data, sampled, scorer, kl_ctl.value, it)
    with timed(timings, "train"):
        plan = plan_training(
            cfg.ppo,
            state.iteration,
            experience.tokens.response_mask,
            data.ptx,
            state.ptx_position,
            data.pad_id,
            cfg.rollout.max_new_tokens,
            lengths=experience.tokens.row_lengths(),
        )
        state.ptx_position += plan.ptx_rows
        announce_poisoned_steps(plan.first_step, len(plan.minibatches))
        train_metrics, skipped = train(roles, experience, plan)
        layout = padding_metrics(plan.policy, experience.tokens, trimmed=cfg.ppo.micro_batch_tokens > 0)
        metrics |= train_metrics | {f"policy/{k}": v for k, v in layout.items()}
        check_nonfinite(state, skipped, cfg.ppo.max_nonfinite_steps, checkpoints)
    with timed(timings, "sync"):
        metrics |= sync_weights(roles, memory)
    kl_ctl.update(metrics["objective/kl"], len(sampled.rollout))
    state.iteration += 1
    state.kl_controller = kl_ctl.state_dict()
    return metrics | timings


def iterate(
    roles: Roles,
    cfg: Config,
    data: RunData,
    state: DriverState,
    kl_ctl,
    writer,
    out: Path,
    scorer: RewardScorer,
) -> None:
    """The remaining iterations: run, evaluate every ``ppo.eval_every`` and at the end
    (:func:`trainers.ppo.evaluate.evaluate`), log (with ``rollout/engine_restarts``, the engines lost and
    recovered during the iteration), print progress, checkpoint every ``ppo.checkpoint_every`` and at the
    end."""
    p = cfg.ppo
    memory = engine_memory(roles)
    while state.iteration < p.iterations:
        restarts = roles.engine_restarts
        metrics = run_iteration(roles, cfg, data, state, kl_ctl, out / "checkpoints", scorer, memory)
        if p.eval_every and (state.iteration % p.eval_every == 0 or state.iteration == p.iterations):
            with timed(metrics, "eval"):
                memory.require_awake("evaluation")
                metrics |= evaluate(roles, cfg, data, scorer, state.iteration)
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
    print(f"ppo: {objective_line(cfg)}", flush=True)
    p = cfg.ppo
    clock = time.perf_counter()
    roles = start_roles(cfg, device, run_name=f"ppo-{uuid.uuid4().hex[:6]}", stop_ids=data.stop_ids)
    print(f"ppo: actors ready in {time.perf_counter() - clock:.1f}s", flush=True)
    for line in placement_lines(roles.placements):
        print(f"ppo: placed {line}", flush=True)
    kl_ctl = algos.make_kl_controller(
        "adaptive" if p.adaptive_kl else "fixed", p.kl_coef, p.kl_target, p.kl_horizon
    )
    state, resumed_from = DriverState(kl_controller=kl_ctl.state_dict(), shape=run_shape(cfg)), 0
    writer = None
    scorer = RewardScorer(cfg, roles, data.stop_ids, data.tokenizer, out / "checkpoints")
    try:
        if resume is not None:
            state = load_checkpoint(roles, resume)
            kl_ctl.load_state_dict(state.kl_controller)
            resumed_from = state.iteration
            sync_weights(roles)  # the engines started from the SFT weights
            print(f"ppo: resumed from {resume} (iteration {state.iteration})", flush=True)
        truncate_metrics(out / "metrics.jsonl", state.iteration)  # before the writer opens the file
        writer = MetricsWriter(out, prefix="ppo", sinks=open_sinks(out, cfg.logging, to_dict(cfg)))
        iterate(roles, cfg, data, state, kl_ctl, writer, out, scorer)
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
        scorer.close()
        roles.shutdown()
