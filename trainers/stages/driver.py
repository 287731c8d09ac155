"""The driver of a Ray Train stage (pretrain, SFT, RM): validate, train, summarise.

    summary = run_stage(sft.SPEC, cfg, "runs/sft")     # trainers.stages.sft.run_sft does this

:func:`run_stage`, in order:

1. validate everything -- config, data files (through trainers.data's validated readers: a bad
   row is a DataError with the same lines ``rlhf data validate`` prints), token lengths, the model
   directory (safetensors), the output directory -- before any Ray worker starts; on a user error
   nothing is written (the output directory is not even created);
2. connect to Ray (cluster/connect.py) and run a ``ray.train.torch.TorchTrainer`` whose
   ``train_loop_per_worker`` is :func:`trainers.stages.worker.train_loop`; the storage path is
   ``OUT/checkpoints`` and the run is named after the stage, so running the same command again resumes
   from the newest checkpoint (Ray Train V2 restores its checkpoint manager from storage; ``--fresh``
   deletes it; a checkpoint of another run shape is refused first, :mod:`trainers.stages.checkpoints`);
3. write ``summary.json`` from the metrics of the last report.

A stop for non-finite steps is *returned* by the workers (``{"stopped": ...}`` as Ray Train's
``Result.return_value``) and raised here as ``RunStopped`` naming the newest checkpoint: raising inside
the workers would let Ray Train's ``max_failures`` retry a deterministic numerical failure as if a worker
had been lost.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.connect import connect
from cluster.faults import FAIL_AFTER_ENV, NONFINITE_ENV, fault_env, injector
from trainers.config import Config, dump_yaml, tokenizer_dir
from trainers.data.tokenizer import load_tokenizer
from trainers.errors import DataError, RunStopped
from trainers.files import atomic_write_json
from trainers.runs.outdir import check_output_dir, prepare_output
from trainers.runs.resume import resume_hint
from trainers.runtime.device import resolve_device, resolve_dtype
from trainers.runtime.dist import backend_for
from trainers.runtime.nonfinite import stop_message
from trainers.stages.batching import plan_steps
from trainers.stages.checkpoints import check_resumable, latest_checkpoint_state, newest_checkpoint
from trainers.stages.plan import StagePlan, make_plan, stage_config
from trainers.stages.task import PreparedData, StageSpec
from trainers.stages.worker import train_loop


def validate_stage(spec: StageSpec, cfg: Config, out_dir: str | Path) -> tuple[Path, PreparedData, tuple]:
    """Everything that can be wrong with a run, checked before any worker starts; writes nothing.

    Order: config, output directory, model source, tokenizer, data (schema, then token lengths),
    batch arithmetic against the data size. Returns ``(out_dir, data, steps)`` with ``steps`` as
    :func:`plan_steps` returns it.
    """
    cfg.validate()
    st = stage_config(cfg, spec.name)
    out = check_output_dir(out_dir)
    spec.check_model(cfg)
    tokenizer = load_tokenizer(tokenizer_dir(cfg), cfg.model.chat_template)
    data = spec.prepare(cfg, tokenizer)
    steps = plan_steps(len(data.train), st.global_batch_size, st.epochs, st.max_steps)
    if steps[0] == 0:
        raise DataError(
            f"{spec.name}: {len(data.train)} training examples, fewer than "
            f"{spec.name}.global_batch_size={st.global_batch_size}"
        )
    return out, data, steps


def run_stage(spec: StageSpec, cfg: Config, out_dir: str | Path, fresh: bool = False) -> dict:
    """Validate, train with Ray Train + DeepSpeed, write ``OUT/summary.json``; return the summary.

    Fault injection for tests comes from the ``RLHF_FAULT_*`` variables (:mod:`cluster.faults`:
    non-finite steps, a worker failure after a step), forwarded to the Ray Train workers.

    Raises :class:`~trainers.errors.RunStopped` when ``<stage>.max_nonfinite_steps`` steps in a row were
    skipped for a non-finite loss or gradient (the workers stop together without saving anything and
    return normally, so Ray Train does not retry it as a lost worker); the message names the checkpoint
    a rerun resumes from.
    """
    start = time.time()
    out, data, steps = validate_stage(spec, cfg, out_dir)
    device = resolve_device(cfg.cluster.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    plan = make_plan(spec, cfg, out, steps, device, dtype)
    announce_faults(spec.name)
    storage = out / "checkpoints"
    if not fresh:
        check_resumable(latest_checkpoint_state(storage / spec.name), plan)
    _connect(spec, cfg)  # an unreachable ray_address is a user error: found before OUT is touched
    prepare_output(out, dump_yaml(cfg), fresh)
    resumed = latest_checkpoint_state(storage / spec.name)
    _announce(spec, plan, data, resumed)
    result = _fit(spec, cfg, plan, data, storage)
    raise_if_stopped(spec.name, result.return_value, stage_config(cfg, spec.name), storage / spec.name)
    metrics = dict(result.metrics or {})
    summary = {k: v for k, v in metrics.items() if k.startswith(f"{spec.name}/")}
    summary[f"{spec.name}/wall_time_s"] = round(time.time() - start, 2)
    if data.overlong:
        summary["data/overlong"] = data.overlong
    summary["model_dir"] = str(out / "model")
    atomic_write_json(out / "summary.json", summary)
    print(
        f"{spec.name}: done in {summary[f'{spec.name}/wall_time_s']:.1f}s; summary in {out / 'summary.json'}"
    )
    return summary


def announce_faults(stage: str) -> None:
    """A line for each fault the environment asks the stage's workers for (:mod:`cluster.faults`); a
    malformed ``RLHF_FAULT_*`` value raises here, before any worker starts."""
    faults = injector()
    steps = sorted(faults.nonfinite_steps.get(stage, ()))
    if steps:
        print(f"{stage}: fault injection ({NONFINITE_ENV}) poisons steps {steps}", flush=True)
    if stage in faults.fail_after:
        print(
            f"{stage}: fault injection ({FAIL_AFTER_ENV}) fails after step {faults.fail_after[stage]}",
            flush=True,
        )


def raise_if_stopped(stage: str, returned: Any, st, storage: Path) -> None:
    """RunStopped if the workers stopped for non-finite steps (their return value says so)."""
    stopped = returned.get("stopped") if isinstance(returned, dict) else None
    if stopped:
        what = f"{stage} step {stopped['step']}"
        hint = resume_hint(newest_checkpoint(storage))
        raise RunStopped(stop_message(what, stopped["longest"], st.max_nonfinite_steps, hint))


def _announce(spec: StageSpec, plan: StagePlan, data: PreparedData, resumed: dict | None) -> None:
    """One line about what is about to run (and where it resumes)."""
    where = f", resuming after step {resumed['step']}" if resumed else ""
    print(
        f"{spec.name}: {len(data.train)} examples, {plan.stop_step} of {plan.schedule_steps} steps "
        f"({plan.steps_per_epoch} per epoch), global batch {plan.stage_cfg.global_batch_size}, "
        f"{plan.world_size} Ray Train workers, ZeRO-{plan.stage_cfg.zero_stage}, {plan.dtype} on "
        f"{plan.device}{where}",
        flush=True,
    )


def _connect(spec: StageSpec, cfg: Config):
    """Ray for this stage (joined, or started locally with room for the workers); the ray module."""
    num_cpus = cfg.cluster.num_cpus or max(4, stage_config(cfg, spec.name).num_workers + 2)
    return connect(cfg.cluster.ray_address, num_cpus=num_cpus, torch_threads=cfg.cluster.torch_threads)


def _fit(spec: StageSpec, cfg: Config, plan: StagePlan, data: PreparedData, storage: Path):
    """Connect to Ray, put the data in the object store and run the TorchTrainer; its Result."""
    st = stage_config(cfg, spec.name)
    ray = _connect(spec, cfg)
    plan = dataclasses.replace(plan, data_ref=ray.put(data))
    use_gpu = plan.device == "cuda"
    resources = {"GPU": 1} if use_gpu else {"CPU": cfg.cluster.cpus_per_actor}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=plan,
        scaling_config=ScalingConfig(
            num_workers=st.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend=backend_for(plan.device)),
        run_config=RunConfig(
            name=spec.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=st.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=st.keep_checkpoints),
            # Ray workers see the environment the cluster started with, not variables set since.
            worker_runtime_env={"env_vars": fault_env()},
        ),
    )
    return trainer.fit()
