"""The worker loop every Ray Train stage runs: build, (resume,) train, evaluate, save.

:func:`train_loop` is the ``train_loop_per_worker``: a DeepSpeed ZeRO-3 model (trainers.runtime.zero),
the stage's *task* (model, collation, loss, evaluation; :class:`~trainers.stages.task.Task`), the data
order of :mod:`trainers.stages.batching`, checkpoints every ``checkpoint_every`` steps and at each epoch
end through ``ray.train.report(checkpoint=...)`` (:mod:`trainers.stages.checkpoints`).

Loss aggregation (docs/ppo_details.md item 24). Rank ``r`` of ``W`` takes the contiguous ``G/W`` of a step's
global batch of ``G`` examples, split into ``A = G/(m W)`` micro-batches of ``m``. The loss is a mean over the
units of the whole global batch (LM: target tokens; RM: prompts with at least one pair): the global unit count
``N`` is all-reduced before the step, and each micro-batch's loss is ``sum / (N / (W A))``
(:func:`trainers.algos.loss_normaliser`), which cancels DeepSpeed's division by ``A`` and its averaging over
``W`` ranks. So 1 and 2 workers give the same losses and gradients up to float summation order
(tests/integration/test_stages.py checks it, and checks the first step's loss and gradient norm against a
single-process computation with plain transformers).

Resume restores the DeepSpeed state (weights, AdamW state, LR schedule), the step counter and each
rank's torch RNG state, so a resumed run continues exactly where the uninterrupted run would be. The LR
schedule always spans ``epochs``; ``max_steps`` only stops early, so raising it and running the same
command again continues the same run.

Non-finite steps (``trainers.runtime.nonfinite``). Every optimizer step goes through
``trainers.runtime.step_guard.StepGuard``: a NaN/inf loss on any rank or a non-finite gradient norm skips
the step on all ranks (weights, AdamW state and LR schedule untouched; the data of that step is consumed,
not retried). The metrics record of the step has ``skipped`` 1 and a null loss; ``LoopState`` counts
skipped steps and the streak in a row (both saved in checkpoints). When the streak reaches
``<stage>.max_nonfinite_steps`` the workers return together before saving anything, and the driver
raises ``RunStopped`` (:mod:`trainers.stages.driver`).

Metrics. Rank 0 writes one record per logged step (``logging.log_every``, plus step 1 and every
epoch end) to ``OUT/metrics.jsonl`` and TensorBoard, and prints a progress line: ``step``,
``epoch``, ``loss`` (global token/prompt mean), ``lr`` (of that step), ``grad_norm`` (before
clipping), ``tokens_per_s`` (real tokens of the global batch / step time), the unit count
(``target_tokens`` or ``prompts``), ``elapsed_s`` (since this invocation's loop started), RM
``accuracy``, and ``valid_*`` at epoch ends. Ray Train gets metrics only with checkpoints: in Ray
Train V2 ``ray.train.report`` blocks until the controller has taken the previous report and the
controller polls every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), so a report per step stalled
steps of a fraction of a second by up to 2 s each.
"""

from __future__ import annotations

import sys
import time

import ray
import ray.train
import torch

from cluster.faults import FAIL_AFTER_ENV, injector
from trainers.algos import loss_normaliser
from trainers.data.sharding import eval_batches, micro_batches, rank_share
from trainers.data.tokenizer import load_tokenizer
from trainers.runs.metrics import MetricsWriter, truncate_metrics
from trainers.runs.progress import progress_line
from trainers.runs.sinks import open_sinks
from trainers.runtime.device import disable_cudnn_attention, torch_dtype
from trainers.runtime.dist import all_reduce_sum, init_distributed
from trainers.runtime.export import save_hf
from trainers.runtime.models import no_dropout_updates, prepare_for_training
from trainers.runtime.nonfinite import update_streak
from trainers.runtime.step_guard import StepGuard
from trainers.runtime.zero import ds_config, grad_accum_steps, hf_deepspeed_context, init_deepspeed, unwrap
from trainers.stages.batching import epoch_order, step_indices
from trainers.stages.checkpoints import LoopState, report, restore_checkpoint, save_checkpoint
from trainers.stages.plan import StagePlan
from trainers.stages.task import PreparedData, Task

TRAIN_LOSS_WINDOW = 10
"""``<stage>/train_loss`` in the summary is the mean loss of the last this-many optimizer steps."""


def train_loop(plan: StagePlan) -> dict | None:
    """``train_loop_per_worker`` of every stage: build, (resume,) train, evaluate, save.

    Returns ``{"stopped": {"step", "longest"}}`` (Ray Train's ``Result.return_value``, from rank 0) when
    the run stopped for non-finite steps, else None.
    """
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if plan.device == "cpu":
        torch.set_num_threads(plan.torch_threads)
    else:
        disable_cudnn_attention()  # non-finite gradients with left padding (see its docstring)
    init_distributed(plan.device)
    st = plan.stage_cfg
    data: PreparedData = ray.get(plan.data_ref)
    tokenizer = load_tokenizer(plan.tokenizer_dir, plan.model.chat_template)
    task = plan.task(plan.model, st, tokenizer)
    accum = grad_accum_steps(st.global_batch_size, st.micro_batch_size, world)
    config = ds_config(st.zero_stage, plan.dtype, st.micro_batch_size, accum, world, st.grad_clip)
    hf_context = hf_deepspeed_context(config)  # noqa: F841 - must stay alive while the model exists
    model = build_ds_model(task, plan, config)
    torch.manual_seed(st.seed * 1009 + rank + 1)  # dropout streams differ per rank
    state = restore_checkpoint(model, rank)
    writer = _open_writer(plan, state) if rank == 0 else None
    try:
        stopped = _train(model, task, data, plan, state, writer, (rank, world, accum))
        if stopped is not None:
            # Every rank agrees (the skip flags are all-reduced); returning, not raising, keeps Ray Train
            # from retrying this as a lost worker. Nothing is saved after the bad steps.
            return {"stopped": stopped}
        _finish(model, task, data, plan, state, tokenizer, (rank, world))
    finally:
        if writer is not None:
            writer.close()
    return None


def build_ds_model(task: Task, plan: StagePlan, config: dict):
    """The task's model wrapped by DeepSpeed with the stage's optimizer and schedule."""
    st = plan.stage_cfg
    module = task.build_model(torch_dtype(plan.dtype))
    module.config.use_cache = False
    prepare_for_training(module, plan.model.gradient_checkpointing)
    return init_deepspeed(
        module,
        config,
        lr=st.lr,
        weight_decay=st.weight_decay,
        total_steps=plan.schedule_steps,
        warmup_ratio=st.warmup_ratio,
        min_lr_ratio=st.min_lr_ratio,
    )


def _open_writer(plan: StagePlan, state: LoopState) -> MetricsWriter:
    """Rank 0's metrics writer; on resume, records past the checkpoint's step are dropped first."""
    truncate_metrics(plan.out_dir / "metrics.jsonl", state.step)
    sinks = open_sinks(plan.out_dir, plan.logging, plan.run_config)
    return MetricsWriter(plan.out_dir, prefix=plan.stage, sinks=sinks)


def _train(
    model, task: Task, data: PreparedData, plan: StagePlan, state: LoopState, writer, shape: tuple
) -> dict | None:
    """Optimizer steps from ``state.step`` to the end, with logging, evaluation and checkpoints.

    ``shape`` is ``(rank, world, accumulation steps)``. A step with a non-finite loss or gradient is
    skipped (logged with ``skipped`` 1); after ``max_nonfinite_steps`` in a row this returns
    ``{"step", "longest"}`` at once -- before any checkpoint -- instead of None at the end.
    """
    rank, world, accum = shape
    st, total, per_epoch = plan.stage_cfg, plan.stop_step, plan.steps_per_epoch
    log_every = plan.logging.log_every
    faults = injector()  # RLHF_FAULT_* of this worker (tests only; inert otherwise)
    started = time.time()
    while state.step < total:
        epoch, index = divmod(state.step, per_epoch)
        order = epoch_order(len(data.train), st.seed, epoch)
        mine = rank_share(step_indices(order, index, st.global_batch_size), rank, world)
        poison = rank == 0 and faults.nonfinite(plan.stage, state.step + 1)
        metrics = train_step(
            model, task, [data.train[i] for i in mine], st.micro_batch_size, world, accum, poison
        )
        state.step += 1
        metrics["epoch"] = epoch
        metrics["elapsed_s"] = time.time() - started
        longest = _count_skipped(state, metrics["skipped"], plan, rank)
        if not metrics["skipped"]:
            _remember(state, metrics)
        epoch_end = state.step % per_epoch == 0 or state.step == total
        if epoch_end:
            state.last_valid = evaluate(model, task, data.valid, st.micro_batch_size, rank, world)
            metrics |= state.last_valid
        if writer is not None and (state.step % log_every == 0 or epoch_end or state.step == 1):
            record = writer.log(state.step, metrics)
            if plan.logging.progress:
                print(progress_line(plan.stage, state.step, total, record), file=sys.__stdout__, flush=True)
        if longest >= st.max_nonfinite_steps:
            return {"step": state.step, "longest": longest}
        # Metrics reach Ray Train only with checkpoints (module docstring). The last step's checkpoint
        # is saved by _finish with the summary: a Result holds the newest *checkpoint* report's metrics.
        due = st.checkpoint_every > 0 and state.step % st.checkpoint_every == 0
        if state.step < total and (due or epoch_end):
            save_checkpoint(model, plan, state, metrics, rank)
        if faults.fails_after(plan.stage, state.step) and state.resumed_from_step is None:
            raise RuntimeError(f"injected failure after step {state.step} ({FAIL_AFTER_ENV})")
    return None


def _count_skipped(state: LoopState, skipped: int, plan: StagePlan, rank: int) -> int:
    """Carry the streak of skipped steps through this step; rank 0 prints a line for a skipped step.
    Returns the streak (what decides stopping)."""
    state.nonfinite_streak, longest = update_streak(state.nonfinite_streak, [bool(skipped)])
    state.skipped_steps += int(skipped)
    if skipped and rank == 0:
        limit = plan.stage_cfg.max_nonfinite_steps
        print(
            f"{plan.stage}: step {state.step} skipped: non-finite loss or gradient "
            f"({state.nonfinite_streak} in a row, stop at {limit})",
            file=sys.__stdout__,
            flush=True,
        )
    return longest


def _remember(state: LoopState, metrics: dict) -> None:
    state.recent_losses = (state.recent_losses + [metrics["loss"]])[-TRAIN_LOSS_WINDOW:]
    state.tokens_per_s = (state.tokens_per_s + [metrics["tokens_per_s"]])[-TRAIN_LOSS_WINDOW:]


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on the model's device (collation builds them on the CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(
    model, task: Task, examples: list, micro: int, world: int, accum: int, poison: bool = False
) -> dict:
    """One optimizer step over this rank's share of the global batch; metrics of the whole step.

    The global unit count is all-reduced first so every micro-batch loss is ``sum / (N / (W A))`` (module
    docstring); the logged loss is the exact global mean. The step goes through a
    :class:`~trainers.runtime.step_guard.StepGuard`: if any rank's loss or the gradient norm is non-finite it
    is skipped on every rank (``skipped`` 1 in the metrics; weights, AdamW state and LR schedule untouched).
    ``poison`` (fault injection, ``cluster.faults``) adds NaN to this rank's first micro-batch loss.
    """
    t0 = time.time()
    model.train()
    batches = [to_device(task.collate(part), model.device) for part in micro_batches(examples, micro)]
    local = [sum(task.units(b) for b in batches), sum(task.tokens(b) for b in batches)]
    global_units, global_tokens = all_reduce_sum(local)
    norm = loss_normaliser(max(global_units, 1.0), world, accum)
    lr = model.get_lr()[0]
    loss_sum, stats = 0.0, {}
    guard = StepGuard(model)
    for i, batch in enumerate(batches):
        loss, extra = task.loss(model, batch, norm)
        if poison and i == 0:
            loss = loss + float("nan")
        guard.backward_step(loss, last=i == len(batches) - 1)
        loss_sum += float(loss.detach()) / (world * accum)
        for key, value in extra.items():
            stats[key] = stats.get(key, 0.0) + float(value)
    keys = sorted(stats)
    reduced = all_reduce_sum([loss_sum] + [stats[k] for k in keys])
    grad_norm = model.get_global_grad_norm()
    metrics = {"loss": reduced[0], "lr": lr, task.units_name: global_units, "skipped": int(not guard.applied)}
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    metrics["tokens_per_s"] = global_tokens / max(time.time() - t0, 1e-9)
    metrics |= task.train_metrics(dict(zip(keys, reduced[1:])))
    return metrics


@torch.no_grad()
def evaluate(model, task: Task, examples: list, batch_size: int, rank: int, world: int) -> dict:
    """Validation metrics over ``examples``, sharded over ranks (collective: every rank calls it)."""
    if not examples:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    for indices, counted in eval_batches(len(examples), batch_size, rank, world):
        batch = to_device(task.collate([examples[i] for i in indices]), model.device)
        batch_sums = task.eval_sums(model, batch)
        if not sums:
            sums = dict.fromkeys(batch_sums, 0.0)
        if counted:
            for key, value in batch_sums.items():
                sums[key] += float(value)
    keys = sorted(sums)
    reduced = all_reduce_sum([sums.get(k, 0.0) for k in keys])
    model.train()
    return task.eval_metrics(dict(zip(keys, reduced)))


def _finish(
    model, task: Task, data: PreparedData, plan: StagePlan, state: LoopState, tokenizer, shape: tuple
) -> None:
    """Final evaluation, the task's finishing step (RM normalisation), model export, final report."""
    rank, world = shape
    if not state.last_valid:
        state.last_valid = evaluate(model, task, data.valid, plan.stage_cfg.micro_batch_size, rank, world)
    updates, extra = task.finish(model, data, (rank, world))
    # Saved models get dropout off (RL wants it off, docs/ppo_details.md item 22) and the KV cache back on.
    updates = no_dropout_updates(unwrap(model).config) | {"use_cache": True} | updates
    save_hf(model, tokenizer, plan.out_dir / "model", config_updates=updates)
    prefix = plan.stage
    summary = {f"{prefix}/{k}": v for k, v in state.last_valid.items()}
    summary |= {f"{prefix}/{k}": v for k, v in extra.items()}
    if state.recent_losses:
        summary[f"{prefix}/train_loss"] = sum(state.recent_losses) / len(state.recent_losses)
        summary[f"{prefix}/tokens_per_s"] = sum(state.tokens_per_s) / len(state.tokens_per_s)
    summary[f"{prefix}/steps"] = state.step
    summary[f"{prefix}/skipped_steps"] = state.skipped_steps
    summary[f"{prefix}/resumed_from_step"] = state.resumed_from_step
    if state.last_checkpoint_step != state.step:
        save_checkpoint(model, plan, state, summary, rank)
    else:  # a rerun of a finished run: its final checkpoint already holds this summary
        report(summary)
    if rank == 0:
        print(f"{prefix}: model saved to {plan.out_dir / 'model'}", file=sys.__stdout__, flush=True)
