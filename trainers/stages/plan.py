"""The description of a stage run that the driver builds once and every worker receives.

:func:`make_plan` builds a frozen :class:`StagePlan` after validation; Ray Train hands it to each worker
as ``train_loop_config``. It carries the stage's :class:`~trainers.stages.task.Task` class, so a worker
needs no registry to find its task. Workers run in a trial folder of their own, so every path in it is
absolute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.config import Config, LoggingConfig, ModelConfig, TrainStageConfig, to_dict, tokenizer_dir
from trainers.stages.task import StageSpec, Task


@dataclass(frozen=True)
class StagePlan:
    """Everything a stage's workers need to know about the run (picklable; built by :func:`make_plan`)."""

    stage: str
    """Stage name: config section, run name, metric prefix (``pretrain``, ``sft``, ``rm``)."""
    task: type[Task]
    """The stage's task class; each worker builds one (model, collation, loss, evaluation)."""
    out_dir: Path
    """The run's absolute output directory (``metrics.jsonl``, ``model/``...)."""
    stage_cfg: TrainStageConfig
    """The stage's config section (``cfg.pretrain`` / ``cfg.sft`` / ``cfg.rm``)."""
    model: ModelConfig
    """The ``model`` config section, ``path`` and ``chat_template`` made absolute."""
    logging: LoggingConfig
    """The ``logging`` config section (rank 0's metrics sinks and progress lines)."""
    run_config: dict
    """The whole resolved config as a dict: W&B's run config (redacted by the sink)."""
    torch_threads: int
    """torch intra-op threads per worker on CPU (``cluster.torch_threads``)."""
    tokenizer_dir: Path
    """Absolute tokenizer directory."""
    device: str
    """``cpu`` or ``cuda`` (resolved from ``cluster.device``)."""
    dtype: str
    """Training dtype, ``fp32`` or ``bf16`` (resolved from ``model.dtype``)."""
    steps_per_epoch: int
    """Full global batches per epoch."""
    schedule_steps: int
    """Optimizer steps the LR schedule spans (all epochs)."""
    stop_step: int
    """The step the run stops after (``max_steps``, else the schedule's end)."""
    data_ref: Any = None
    """Ray object reference of the :class:`~trainers.stages.task.PreparedData` (set right before training)."""

    @property
    def world_size(self) -> int:
        """Ray Train workers (data-parallel ranks)."""
        return self.stage_cfg.num_workers

    def run_shape(self) -> dict[str, int]:
        """What a checkpoint only resumes with the same values of (ZeRO partitions, step counters)."""
        return {
            "world_size": self.world_size,
            "global_batch_size": self.stage_cfg.global_batch_size,
            "micro_batch_size": self.stage_cfg.micro_batch_size,
            "zero_stage": self.stage_cfg.zero_stage,
        }


def stage_config(cfg: Config, stage: str) -> TrainStageConfig:
    """The stage's section of the config (``cfg.pretrain`` / ``cfg.sft`` / ``cfg.rm``)."""
    return getattr(cfg, stage)


def make_plan(
    spec: StageSpec, cfg: Config, out: Path, steps: tuple[int, int, int], device: str, dtype: str
) -> StagePlan:
    """The plan of a validated run: ``steps`` as :func:`~trainers.stages.batching.plan_steps` returns it.

    The config sections are copies: the plan does not change when ``cfg`` does.
    """
    model = dataclasses.replace(cfg.model)
    if model.path:
        model.path = str(Path(model.path).resolve())  # workers may run in another directory
    if model.chat_template:
        model.chat_template = str(Path(model.chat_template).resolve())
    return StagePlan(
        stage=spec.name,
        task=spec.task,
        out_dir=Path(out),
        stage_cfg=dataclasses.replace(stage_config(cfg, spec.name)),
        model=model,
        logging=dataclasses.replace(cfg.logging),
        run_config=to_dict(cfg),
        torch_threads=cfg.cluster.torch_threads,
        tokenizer_dir=tokenizer_dir(cfg).resolve(),
        device=device,
        dtype=dtype,
        steps_per_epoch=steps[0],
        schedule_steps=steps[1],
        stop_step=steps[2],
    )
