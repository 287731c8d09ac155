"""What the Ray Train stages (pretrain, SFT, RM) share: validation, the driver, the worker loop.

    summary = run_stage(SFT_SPEC, cfg, "runs/sft")     # trainers.stages.sft.run_sft does this

Driver (:func:`run_stage`), in order:

1. validate everything -- config, data files (through trainers.data's validated readers: a bad
   row is a DataError with the same lines ``rlhf data validate`` prints), token lengths, the model
   directory (safetensors), the output directory -- before any Ray worker starts; on a user error
   nothing is written (the output directory is not even created);
2. connect to Ray (cluster/connect.py) and run a ``ray.train.torch.TorchTrainer`` whose
   ``train_loop_per_worker`` is :func:`train_loop`; the storage path is ``OUT/checkpoints`` and the
   run is named after the stage, so running the same command again resumes from the newest
   checkpoint (Ray Train V2 restores its checkpoint manager from storage; ``--fresh`` deletes it);
3. write ``summary.json`` from the metrics of the last report.

Worker (:func:`train_loop`): DeepSpeed ZeRO-3 engine (trainers.runtime.zero), the stage's *task* (model,
collation, loss, evaluation; see :class:`Task`), deterministic data order, checkpoints every
``checkpoint_every`` steps and at each epoch end through ``ray.train.report(checkpoint=...)``.

Batching and loss aggregation (PPO_DETAILS 24). Each epoch is a seeded permutation of the training
examples; optimizer step ``s`` takes the ``G = global_batch_size`` examples at positions
``[s*G, (s+1)*G)`` of it, and rank ``r`` of ``W`` takes the contiguous ``G/W`` of those, split into
``A = G/(m W)`` micro-batches of ``m``. The union over ranks is the same whatever ``W``. The loss is
a mean over the units of the whole global batch (LM: target tokens; RM: prompts with at least one
pair): the global unit count ``N`` is all-reduced before the step, and each micro-batch's loss is
``sum / (N / (W A))`` (:func:`trainers.algos.loss_normaliser`), which cancels DeepSpeed's division
by ``A`` and its averaging over ``W`` ranks. So 1 and 2 workers give the same losses and gradients
up to float summation order (tests/integration/test_stages.py checks it, and checks the first
step's gradient norm against a single-process computation).

Resume restores the engine (weights, AdamW state, LR schedule), the step counter (which fixes the
epoch and the position in it, since the order is a function of seed and epoch) and each rank's
torch RNG state, so a resumed run continues exactly where the uninterrupted run would be. The LR
schedule always spans ``epochs``; ``max_steps`` only stops early, so raising it and running the
same command again continues the same run.

Non-finite steps (``trainers.runtime.nonfinite``). Every optimizer step goes through
``trainers.runtime.step_guard.StepGuard``: a NaN/inf loss on any rank or a non-finite gradient norm skips the step
on all ranks (weights, AdamW state and LR schedule untouched; the data of that step is consumed, not
retried). The metrics record of the step has ``skipped`` 1 and a null loss; ``LoopState`` counts
skipped steps and the streak in a row (both saved in checkpoints). When the streak reaches
``<stage>.max_nonfinite_steps`` the workers return together before saving anything, and the driver
raises ``RunStopped`` naming the newest checkpoint: returning instead of raising keeps Ray Train's
``max_failures`` from retrying a deterministic numerical failure as if a worker had been lost.

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

import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainers.config import Config, LoggingConfig, dump_yaml, to_dict
from trainers.data.sharding import eval_batches, micro_batches, rank_share
from trainers.errors import DataError
from trainers.files import atomic_write_json
from trainers.runs.metrics import MetricsWriter, truncate_metrics
from trainers.runs.outdir import check_output_dir, prepare_output
from trainers.runs.progress import progress_line
from trainers.runs.resume import check_run_shape, resume_hint
from trainers.runs.sinks import open_sinks

CHECKPOINT_TAG = "engine"
"""DeepSpeed checkpoint tag inside each Ray Train checkpoint directory."""
STATE_FILE = "trainer_state.json"
"""Step counters and run shape, next to the DeepSpeed files of a checkpoint."""
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's record of its registered checkpoints, in the run directory (names the one it restores)."""
TRAIN_LOSS_WINDOW = 10
"""``<stage>/train_loss`` in the summary is the mean loss of the last this-many optimizer steps."""
# --------------------------------------------------------------------------------------------------
# Stage description
# --------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """A stage's tokenized data, built on the driver during validation and shipped to the workers."""

    train: list
    """Training examples (their form is the task's: ``(ids, n_prompt)`` or ranked groups)."""
    valid: list
    """Validation examples, same form."""
    extra: dict[str, list] = field(default_factory=dict)
    """Other sets a task needs (the RM's demonstrations for normalisation)."""


@dataclass
class StageSpec:
    """One Ray Train stage: its name, its driver-side preparation and its worker-side task."""

    name: str
    """Stage name: config section, run name, metric prefix (``pretrain``, ``sft``, ``rm``)."""
    prepare: Callable[[Config, Any], PreparedData]
    """``prepare(cfg, tokenizer)``: read, validate and tokenize the data (raises UserError)."""
    check_model: Callable[[Config], None]
    """Validate the model source of the stage (raises ConfigError)."""
    task: Callable[[dict, Any], Task]
    """``task(plan, tokenizer)`` on each worker: the stage's model, batches, loss and evaluation."""


class Task:
    """The stage-specific part of the worker loop (see pretrain.py/sft.py: LM, rm.py: RM).

    ``units`` are what the loss is a mean over (LM: target tokens; RM: prompts with a pair).
    """

    units_name: str = "units"
    """Metric name of the step's global unit count (``target_tokens``, ``prompts``)."""

    def __init__(self, plan: dict, tokenizer):
        self.plan = plan
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The model to train (called while the ZeRO-3 HfDeepSpeedConfig is alive)."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        """A batch dict of tensors from examples."""
        raise NotImplementedError

    def units(self, batch: dict) -> int:
        """Loss units in the batch."""
        raise NotImplementedError

    def tokens(self, batch: dict) -> int:
        """Real tokens in the batch (throughput)."""
        return int(batch["attention_mask"].sum())

    def loss(self, engine, batch: dict, num_units: float) -> tuple[torch.Tensor, dict[str, float]]:
        """``(sum over the batch's units / num_units, extra summable stats)``."""
        raise NotImplementedError

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Extra per-step metrics from the all-reduced stats (e.g. RM accuracy)."""
        return {}

    def eval_sums(self, engine, batch: dict) -> dict[str, float]:
        """Summable evaluation statistics of one validation batch (no grad)."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics (``valid_loss``...) from all-reduced sums."""
        raise NotImplementedError

    def finish(self, engine, data: PreparedData, shape: tuple) -> tuple[dict, dict]:
        """After training (collective; ``shape`` = (rank, world)): ``(config updates for the saved
        model, extra summary metrics)``."""
        return {}, {}


# --------------------------------------------------------------------------------------------------
# Batching (pure)
# --------------------------------------------------------------------------------------------------


def plan_steps(n_train: int, global_batch: int, epochs: int, max_steps: int) -> tuple[int, int, int]:
    """``(steps_per_epoch, schedule_steps, stop_step)``.

    Full global batches per epoch (the remainder is dropped, a different part each epoch); the LR
    schedule spans all ``epochs``; ``max_steps`` (when positive) stops the run early *without*
    changing the schedule, so a run stopped at N and continued with a larger ``max_steps`` is the
    same run as one never stopped.
    """
    steps_per_epoch = n_train // global_batch
    schedule = steps_per_epoch * epochs
    stop = min(schedule, max_steps) if max_steps > 0 else schedule
    return steps_per_epoch, schedule, stop


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of ``range(n)`` for ``epoch`` (same on every rank and every run)."""
    order = list(range(n))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


def step_indices(order: Sequence[int], index_in_epoch: int, global_batch: int) -> list[int]:
    """The global batch of optimizer step ``index_in_epoch`` of an epoch."""
    start = index_in_epoch * global_batch
    return list(order[start : start + global_batch])


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def stage_config(cfg: Config, stage: str):
    """The stage's section of the config (``cfg.pretrain`` / ``cfg.sft`` / ``cfg.rm``)."""
    return getattr(cfg, stage)


def validate_stage(spec: StageSpec, cfg: Config, out_dir: str | Path) -> tuple[Path, PreparedData, tuple]:
    """Everything that can be wrong with a run, checked before any worker starts; writes nothing.

    Order: config, output directory, model source, tokenizer, data (schema, then token lengths),
    batch arithmetic against the data size. Returns ``(out_dir, data, steps)`` with ``steps`` as
    :func:`plan_steps` returns it.
    """
    from trainers.config import tokenizer_dir
    from trainers.data.tokenizer import load_tokenizer

    cfg.validate()
    st = stage_config(cfg, spec.name)
    out = check_output_dir(out_dir)
    spec.check_model(cfg)
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    data = spec.prepare(cfg, tokenizer)
    steps = plan_steps(len(data.train), st.global_batch_size, st.epochs, st.max_steps)
    if steps[0] == 0:
        raise DataError(
            f"{spec.name}: {len(data.train)} training examples, fewer than "
            f"{spec.name}.global_batch_size={st.global_batch_size}"
        )
    return out, data, steps


def newest_checkpoint(storage: Path) -> Path | None:
    """The checkpoint a rerun resumes from, under a Ray Train run directory (None: a rerun starts over).

    That is the newest checkpoint Ray Train's checkpoint manager registered, named in its snapshot
    file -- Ray Train restores from nothing else. It is not simply the highest step on disk: the
    controller registers a reported checkpoint only when it next polls (every 2 s), and workers that
    outlive a SIGKILLed driver for a few seconds can still write checkpoint folders nobody registers
    (seen: folders up to step 6, resumed from step 2; folders up to step 4 and no snapshot yet: the rerun
    started over). Such folders are ignored, and overwritten when the rerun reaches their step.
    """
    try:
        latest = json.loads((storage / SNAPSHOT_FILE).read_text()).get("latest_checkpoint_result") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    name = latest.get("checkpoint_dir_name")
    return storage / name if name and (storage / name / STATE_FILE).is_file() else None


def latest_checkpoint_state(storage: Path) -> dict | None:
    """The trainer state of the checkpoint a rerun resumes from (:func:`newest_checkpoint`), or None."""
    path = newest_checkpoint(storage)
    try:
        return json.loads((path / STATE_FILE).read_text()) if path else None
    except (OSError, json.JSONDecodeError):
        return None


def check_resumable(state: dict | None, plan: dict) -> None:
    """ConfigError if a checkpoint exists but was made with another run shape (use --fresh)."""
    if state is None:
        return
    keys = ("world_size", "global_batch_size", "micro_batch_size", "zero_stage")
    check_run_shape(state, {key: plan[key] for key in keys}, plan["out_dir"])


def make_plan(
    spec: StageSpec, cfg: Config, out: Path, steps: tuple[int, int, int], device: str, dtype: str
) -> dict:
    """The picklable description of the run that every worker receives as ``train_loop_config``."""
    from trainers.config import tokenizer_dir

    st = stage_config(cfg, spec.name)
    model = to_dict(cfg)["model"]
    if model["path"]:
        model["path"] = str(Path(model["path"]).resolve())  # workers may run in another directory
    return {
        "stage": spec.name,
        "out_dir": str(out),
        "stage_cfg": to_dict(cfg)[spec.name],
        "model": model,
        "logging": to_dict(cfg)["logging"],
        "config": to_dict(cfg),  # for W&B's run config (redacted by the writer)
        "torch_threads": cfg.cluster.torch_threads,
        "tokenizer_dir": str(tokenizer_dir(cfg).resolve()),
        "device": device,
        "dtype": dtype,
        "steps_per_epoch": steps[0],
        "schedule_steps": steps[1],
        "stop_step": steps[2],
        "world_size": st.num_workers,
        "global_batch_size": st.global_batch_size,
        "micro_batch_size": st.micro_batch_size,
        "zero_stage": st.zero_stage,
    }


def run_stage(
    spec: StageSpec,
    cfg: Config,
    out_dir: str | Path,
    fresh: bool = False,
    fail_at_step: int | None = None,
    nonfinite_at_steps: Sequence[int] | None = None,
) -> dict:
    """Validate, train with Ray Train + DeepSpeed, write ``OUT/summary.json``; return the summary.

    ``fail_at_step`` is a testing hook: every worker raises right after that optimizer step
    (and its checkpoint, if one is due) unless the run resumed from a checkpoint, which
    exercises Ray Train's failure handling and resuming. ``nonfinite_at_steps`` is another: those
    optimizer steps (1-based) get a NaN loss on rank 0 (default: from ``RLHF_FAULT_NONFINITE_STEPS``,
    see ``trainers.runtime.nonfinite``).

    Raises :class:`~trainers.errors.RunStopped` when ``<stage>.max_nonfinite_steps`` steps in a row were
    skipped for a non-finite loss or gradient (the workers stop together without saving anything and
    return normally, so Ray Train does not retry it as a lost worker); the message names the checkpoint
    a rerun resumes from.
    """
    from trainers.runtime.device import resolve_device, resolve_dtype

    start = time.time()
    out, data, steps = validate_stage(spec, cfg, out_dir)
    device = resolve_device(cfg.cluster.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    plan = make_plan(spec, cfg, out, steps, device, dtype)
    plan["fail_at_step"] = fail_at_step
    plan["nonfinite_at_steps"] = _fault_steps(spec.name, nonfinite_at_steps)
    storage = out / "checkpoints"
    if not fresh:
        check_resumable(latest_checkpoint_state(storage / spec.name), plan)
    _connect(spec, cfg)  # an unreachable ray_address is a user error: found before OUT is touched
    prepare_output(out, dump_yaml(cfg), fresh)
    resumed = latest_checkpoint_state(storage / spec.name)
    _announce(spec, plan, data, resumed)
    result = _fit(spec, cfg, plan, data, storage)
    _raise_if_stopped(spec.name, result.return_value, stage_config(cfg, spec.name), storage / spec.name)
    metrics = dict(result.metrics or {})
    summary = {k: v for k, v in metrics.items() if k.startswith(f"{spec.name}/")}
    summary[f"{spec.name}/wall_time_s"] = round(time.time() - start, 2)
    summary["model_dir"] = str(out / "model")
    atomic_write_json(out / "summary.json", summary)
    print(
        f"{spec.name}: done in {summary[f'{spec.name}/wall_time_s']:.1f}s; summary in {out / 'summary.json'}"
    )
    return summary


def _fault_steps(stage: str, given: Sequence[int] | None) -> list[int]:
    """Steps to poison (fault injection, ``trainers.runtime.nonfinite``): ``given``, else the environment's."""
    from cluster.faults import NONFINITE_ENV, injector

    steps = sorted(given if given is not None else injector().nonfinite_steps.get(stage, ()))
    if steps:
        print(
            f"{stage}: fault injection ({NONFINITE_ENV} / nonfinite_at_steps) poisons steps {steps}",
            flush=True,
        )
    return steps


def _raise_if_stopped(stage: str, returned: Any, st, storage: Path) -> None:
    """RunStopped if the workers stopped for non-finite steps (their return value says so)."""
    from trainers.errors import RunStopped
    from trainers.runtime.nonfinite import stop_message

    stopped = returned.get("stopped") if isinstance(returned, dict) else None
    if stopped:
        what = f"{stage} step {stopped['step']}"
        hint = resume_hint(newest_checkpoint(storage))
        raise RunStopped(stop_message(what, stopped["longest"], st.max_nonfinite_steps, hint))


def _announce(spec: StageSpec, plan: dict, data: PreparedData, resumed: dict | None) -> None:
    """One line about what is about to run (and where it resumes)."""
    where = f", resuming after step {resumed['step']}" if resumed else ""
    print(
        f"{spec.name}: {len(data.train)} examples, {plan['stop_step']} of {plan['schedule_steps']} steps "
        f"({plan['steps_per_epoch']} per epoch), global batch {plan['global_batch_size']}, "
        f"{plan['world_size']} Ray Train workers, ZeRO-{plan['zero_stage']}, {plan['dtype']} on "
        f"{plan['device']}{where}",
        flush=True,
    )


def _connect(spec: StageSpec, cfg: Config):
    """Ray for this stage (joined, or started locally with room for the workers); the ray module."""
    from cluster.connect import connect

    num_cpus = cfg.cluster.num_cpus or max(4, stage_config(cfg, spec.name).num_workers + 2)
    return connect(cfg.cluster.ray_address, num_cpus=num_cpus, torch_threads=cfg.cluster.torch_threads)


def _fit(spec: StageSpec, cfg: Config, plan: dict, data: PreparedData, storage: Path):
    """Connect to Ray, put the data in the object store and run the TorchTrainer; its Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.runtime.dist import backend_for

    st = stage_config(cfg, spec.name)
    ray = _connect(spec, cfg)
    plan = dict(plan, data_ref=ray.put(data))
    use_gpu = plan["device"] == "cuda"
    resources = {"GPU": 1} if use_gpu else {"CPU": cfg.cluster.cpus_per_actor}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=plan,
        scaling_config=ScalingConfig(
            num_workers=st.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend=backend_for(plan["device"])),
        run_config=RunConfig(
            name=spec.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=st.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=st.keep_checkpoints),
        ),
    )
    return trainer.fit()


# --------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Counters that a checkpoint saves and a resume restores."""

    step: int = 0
    """Optimizer steps done."""
    recent_losses: list = field(default_factory=list)
    """Losses of the last TRAIN_LOSS_WINDOW steps (for the summary's train_loss)."""
    tokens_per_s: list = field(default_factory=list)
    """Recent throughput values."""
    last_valid: dict = field(default_factory=dict)
    """Validation metrics of the latest evaluation."""
    last_checkpoint_step: int = -1
    resumed_from_step: int | None = None
    nonfinite_streak: int = 0
    """Optimizer steps skipped in a row (non-finite loss or gradient) up to ``step``."""
    skipped_steps: int = 0
    """Optimizer steps skipped so far in the run."""


def train_loop(plan: dict) -> dict | None:
    """``train_loop_per_worker`` of every stage: build, (resume,) train, evaluate, save.

    Returns ``{"stopped": {"step", "longest"}}`` (Ray Train's ``Result.return_value``, from rank 0) when
    the run stopped for non-finite steps, else None.
    """
    import ray
    import ray.train

    from trainers.data.tokenizer import load_tokenizer
    from trainers.runtime.device import disable_cudnn_attention
    from trainers.runtime.dist import init_distributed
    from trainers.runtime.zero import ds_config, grad_accum_steps, hf_deepspeed_context

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if plan["device"] == "cpu":
        torch.set_num_threads(plan["torch_threads"])
    else:
        disable_cudnn_attention()  # non-finite gradients with left padding (see its docstring)
    init_distributed(plan["device"])
    st = plan["stage_cfg"]
    data: PreparedData = ray.get(plan["data_ref"])
    tokenizer = load_tokenizer(plan["tokenizer_dir"])
    task = _make_task(plan, tokenizer)
    accum = grad_accum_steps(st["global_batch_size"], st["micro_batch_size"], world)
    config = ds_config(st["zero_stage"], plan["dtype"], st["micro_batch_size"], accum, world, st["grad_clip"])
    hf_context = hf_deepspeed_context(config)  # noqa: F841 - must stay alive while the model exists
    engine = _build_engine(task, plan, config)
    torch.manual_seed(st["seed"] * 1009 + rank + 1)  # dropout streams differ per rank
    state = _restore(engine, rank)
    writer = _open_writer(plan, state) if rank == 0 else None
    try:
        stopped = _train(engine, task, data, plan, state, writer, (rank, world, accum))
        if stopped is not None:
            # Every rank agrees (the skip flags are all-reduced); returning, not raising, keeps Ray Train
            # from retrying this as a lost worker. Nothing is saved after the bad steps.
            return {"stopped": stopped}
        _finish(engine, task, data, plan, state, tokenizer, (rank, world))
    finally:
        if writer is not None:
            writer.close()
    return None


def _make_task(plan: dict, tokenizer) -> Task:
    from trainers.stages import get_spec

    return get_spec(plan["stage"]).task(plan, tokenizer)


def _build_engine(task: Task, plan: dict, config: dict):
    """The task's model inside a DeepSpeed engine with the stage's optimizer and schedule."""
    from trainers.runtime.device import torch_dtype
    from trainers.runtime.zero import init_deepspeed

    st = plan["stage_cfg"]
    model = task.build_model(torch_dtype(plan["dtype"]))
    model.config.use_cache = False
    if plan["model"]["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return init_deepspeed(
        model,
        config,
        lr=st["lr"],
        weight_decay=st["weight_decay"],
        total_steps=plan["schedule_steps"],
        warmup_ratio=st["warmup_ratio"],
        min_lr_ratio=st["min_lr_ratio"],
    )


def rng_state() -> dict:
    """This process's torch RNG states (CPU, and CUDA when present): dropout's randomness."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(saved: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(saved["cpu"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _restore(engine, rank: int) -> LoopState:
    """Load the newest Ray Train checkpoint (engine, counters, this rank's RNG), if there is one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as path:
        loaded, _ = engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if loaded is None:  # DeepSpeed returns (None, None) instead of raising when nothing matched
            raise RuntimeError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' in {path}")
        saved = json.loads((Path(path) / STATE_FILE).read_text())
        set_rng_state(torch.load(Path(path) / f"rng_rank{rank}.pt", weights_only=False))
    state = LoopState(**saved["loop"])
    state.resumed_from_step = state.step
    return state


def _open_writer(plan: dict, state: LoopState) -> MetricsWriter:
    """Rank 0's metrics writer; on resume, records past the checkpoint's step are dropped first."""
    out = Path(plan["out_dir"])
    truncate_metrics(out / "metrics.jsonl", state.step)
    sinks = open_sinks(out, LoggingConfig(**plan["logging"]), plan.get("config"))
    return MetricsWriter(out, prefix=plan["stage"], sinks=sinks)


def _train(
    engine, task: Task, data: PreparedData, plan: dict, state: LoopState, writer, shape: tuple
) -> dict | None:
    """Optimizer steps from ``state.step`` to the end, with logging, evaluation and checkpoints.

    ``shape`` is ``(rank, world, accumulation steps)``. A step with a non-finite loss or gradient is
    skipped (logged with ``skipped`` 1); after ``max_nonfinite_steps`` in a row this returns
    ``{"step", "longest"}`` at once -- before any checkpoint -- instead of None at the end.
    """
    rank, world, accum = shape
    st, total, per_epoch = plan["stage_cfg"], plan["stop_step"], plan["steps_per_epoch"]
    log_every = plan["logging"]["log_every"]
    poisoned = set(plan.get("nonfinite_at_steps") or ())
    started = time.time()
    while state.step < total:
        epoch, index = divmod(state.step, per_epoch)
        order = epoch_order(len(data.train), st["seed"], epoch)
        mine = rank_share(step_indices(order, index, st["global_batch_size"]), rank, world)
        poison = rank == 0 and state.step + 1 in poisoned
        metrics = train_step(
            engine, task, [data.train[i] for i in mine], st["micro_batch_size"], world, accum, poison
        )
        state.step += 1
        metrics["epoch"] = epoch
        metrics["elapsed_s"] = time.time() - started
        longest = _count_skipped(state, metrics["skipped"], plan, rank)
        if not metrics["skipped"]:
            _remember(state, metrics)
        epoch_end = state.step % per_epoch == 0 or state.step == total
        if epoch_end:
            state.last_valid = evaluate(engine, task, data.valid, st["micro_batch_size"], rank, world)
            metrics |= state.last_valid
        if writer is not None and (state.step % log_every == 0 or epoch_end or state.step == 1):
            record = writer.log(state.step, metrics)
            if plan["logging"]["progress"]:
                print(
                    progress_line(plan["stage"], state.step, total, record), file=sys.__stdout__, flush=True
                )
        if longest >= st["max_nonfinite_steps"]:
            return {"step": state.step, "longest": longest}
        # Metrics reach Ray Train only with checkpoints (module docstring). The last step's checkpoint
        # is saved by _finish with the summary: a Result holds the newest *checkpoint* report's metrics.
        due = st["checkpoint_every"] > 0 and state.step % st["checkpoint_every"] == 0
        if state.step < total and (due or epoch_end):
            save_checkpoint(engine, plan, state, metrics, rank)
        if plan.get("fail_at_step") == state.step and state.resumed_from_step is None:
            raise RuntimeError(f"injected failure after step {state.step} (fail_at_step testing hook)")
    return None


def _count_skipped(state: LoopState, skipped: int, plan: dict, rank: int) -> int:
    """Carry the streak of skipped steps through this step; rank 0 prints a line for a skipped step.
    Returns the streak (what decides stopping)."""
    from trainers.runtime.nonfinite import update_streak

    state.nonfinite_streak, longest = update_streak(state.nonfinite_streak, [bool(skipped)])
    state.skipped_steps += int(skipped)
    if skipped and rank == 0:
        limit = plan["stage_cfg"]["max_nonfinite_steps"]
        print(
            f"{plan['stage']}: step {state.step} skipped: non-finite loss or gradient "
            f"({state.nonfinite_streak} in a row, stop at {limit})",
            file=sys.__stdout__,
            flush=True,
        )
    return longest


def _remember(state: LoopState, metrics: dict) -> None:
    state.recent_losses = (state.recent_losses + [metrics["loss"]])[-TRAIN_LOSS_WINDOW:]
    state.tokens_per_s = (state.tokens_per_s + [metrics["tokens_per_s"]])[-TRAIN_LOSS_WINDOW:]


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on the engine's device (collation builds them on the CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(
    engine, task: Task, examples: list, micro: int, world: int, accum: int, poison: bool = False
) -> dict:
    """One optimizer step over this rank's share of the global batch; metrics of the whole step.

    The global unit count is all-reduced first so every micro-batch loss is ``sum / (N / (W A))``
    (module docstring); the logged loss is the exact global mean. The step goes through a
    :class:`~trainers.runtime.step_guard.StepGuard`: if any rank's loss or the gradient norm is non-finite it is
    skipped on every rank (``skipped`` 1 in the metrics; weights, AdamW state and LR schedule
    untouched). ``poison`` (fault injection) adds NaN to this rank's first micro-batch loss.
    """
    from trainers.algos import loss_normaliser
    from trainers.runtime.dist import all_reduce_sum
    from trainers.runtime.step_guard import StepGuard

    t0 = time.time()
    engine.train()
    batches = [to_device(task.collate(part), engine.device) for part in micro_batches(examples, micro)]
    local = [sum(task.units(b) for b in batches), sum(task.tokens(b) for b in batches)]
    global_units, global_tokens = all_reduce_sum(local)
    norm = loss_normaliser(max(global_units, 1.0), world, accum)
    lr = engine.get_lr()[0]
    loss_sum, stats = 0.0, {}
    guard = StepGuard(engine)
    for i, batch in enumerate(batches):
        loss, extra = task.loss(engine, batch, norm)
        if poison and i == 0:
            loss = loss + float("nan")
        guard.backward_step(loss, last=i == len(batches) - 1)
        loss_sum += float(loss.detach()) / (world * accum)
        for key, value in extra.items():
            stats[key] = stats.get(key, 0.0) + float(value)
    keys = sorted(stats)
    reduced = all_reduce_sum([loss_sum] + [stats[k] for k in keys])
    grad_norm = engine.get_global_grad_norm()
    metrics = {"loss": reduced[0], "lr": lr, task.units_name: global_units, "skipped": int(not guard.applied)}
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    metrics["tokens_per_s"] = global_tokens / max(time.time() - t0, 1e-9)
    metrics |= task.train_metrics(dict(zip(keys, reduced[1:])))
    return metrics


@torch.no_grad()
def evaluate(engine, task: Task, examples: list, batch_size: int, rank: int, world: int) -> dict:
    """Validation metrics over ``examples``, sharded over ranks (collective: every rank calls it)."""
    from trainers.runtime.dist import all_reduce_sum

    if not examples:
        return {}
    engine.eval()
    sums: dict[str, float] = {}
    for indices, counted in eval_batches(len(examples), batch_size, rank, world):
        batch = to_device(task.collate([examples[i] for i in indices]), engine.device)
        batch_sums = task.eval_sums(engine, batch)
        if not sums:
            sums = dict.fromkeys(batch_sums, 0.0)
        if counted:
            for key, value in batch_sums.items():
                sums[key] += float(value)
    keys = sorted(sums)
    reduced = all_reduce_sum([sums.get(k, 0.0) for k in keys])
    engine.train()
    return task.eval_metrics(dict(zip(keys, reduced)))


def _report(metrics: dict, checkpoint=None, name: str | None = None) -> None:
    import ray.train

    ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)


def save_checkpoint(engine, plan: dict, state: LoopState, metrics: dict, rank: int) -> None:
    """DeepSpeed state + loop counters + RNG into a temp dir, reported as a Ray Train checkpoint."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        state.last_checkpoint_step = state.step
        if rank == 0:
            loop = {
                k: v for k, v in vars(state).items() if not k.startswith("_") and k != "resumed_from_step"
            }
            saved = {
                key: plan[key] for key in ("stage", "world_size", "global_batch_size", "micro_batch_size")
            }
            saved |= {"zero_stage": plan["zero_stage"], "step": state.step, "loop": loop}
            atomic_write_json(Path(tmp) / STATE_FILE, saved)
        _report(metrics, Checkpoint.from_directory(tmp), name=f"step_{state.step:07d}")


def _finish(
    engine, task: Task, data: PreparedData, plan: dict, state: LoopState, tokenizer, shape: tuple
) -> None:
    """Final evaluation, the task's finishing step (RM normalisation), model export, final report."""
    from trainers.runtime.export import save_hf
    from trainers.runtime.models import no_dropout_updates
    from trainers.runtime.zero import unwrap

    rank, world = shape
    st = plan["stage_cfg"]
    if not state.last_valid:
        state.last_valid = evaluate(engine, task, data.valid, st["micro_batch_size"], rank, world)
    updates, extra = task.finish(engine, data, (rank, world))
    # Saved models get dropout off (RL wants it off, PPO_DETAILS 22) and the KV cache back on.
    updates = no_dropout_updates(unwrap(engine).config) | {"use_cache": True} | updates
    save_hf(engine, tokenizer, Path(plan["out_dir"]) / "model", config_updates=updates)
    prefix = plan["stage"]
    summary = {f"{prefix}/{k}": v for k, v in state.last_valid.items()}
    summary |= {f"{prefix}/{k}": v for k, v in extra.items()}
    if state.recent_losses:
        summary[f"{prefix}/train_loss"] = sum(state.recent_losses) / len(state.recent_losses)
        summary[f"{prefix}/tokens_per_s"] = sum(state.tokens_per_s) / len(state.tokens_per_s)
    summary[f"{prefix}/steps"] = state.step
    summary[f"{prefix}/skipped_steps"] = state.skipped_steps
    summary[f"{prefix}/resumed_from_step"] = state.resumed_from_step
    if state.last_checkpoint_step != state.step:
        save_checkpoint(engine, plan, state, summary, rank)
    else:  # a rerun of a finished run: its final checkpoint already holds this summary
        _report(summary)
    if rank == 0:
        print(f"{prefix}: model saved to {Path(plan['out_dir']) / 'model'}", file=sys.__stdout__, flush=True)
