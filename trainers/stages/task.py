"""What makes one Ray Train stage different from another: its data (driver side) and its task (worker side).

A stage is a :class:`StageSpec`: ``prepare`` reads, validates and tokenizes the data on the driver into
:class:`PreparedData`; ``check_model`` validates the model source; ``task`` is the :class:`Task` class
each worker builds for the stage-specific part of the loop (model, collation, loss, evaluation). The
loop itself (:mod:`trainers.stages.worker`) and the driver (:mod:`trainers.stages.driver`) are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainers.config import Config, ModelConfig, TrainStageConfig


@dataclass
class PreparedData:
    """A stage's tokenized data, built on the driver during validation and shipped to the workers."""

    train: list
    """Training examples (their form is the task's: ``(ids, n_prompt or target spans)`` or ranked groups)."""
    valid: list
    """Validation examples, same form."""
    extra: dict[str, list] = field(default_factory=dict)
    """Other sets a task needs (the RM's demonstrations for normalisation)."""
    overlong: dict[str, dict] = field(default_factory=dict)
    """What ``data.overlong`` dropped or cut, per file (``summary.json``'s ``data/overlong``)."""


@dataclass
class StageSpec:
    """One Ray Train stage: its name, its driver-side preparation and its worker-side task."""

    name: str
    """Stage name: config section, run name, metric prefix (``pretrain``, ``sft``, ``rm``)."""
    prepare: Callable[[Config, Any], PreparedData]
    """``prepare(cfg, tokenizer)``: read, validate and tokenize the data (raises UserError)."""
    check_model: Callable[[Config], None]
    """Validate the model source of the stage (raises ConfigError)."""
    task: type[Task]
    """The task class; each worker builds ``task(model section, stage section, tokenizer)``."""


class Task:
    """The stage-specific part of the worker loop (see pretrain.py/sft.py: LM, rm.py: RM).

    ``units`` are what the loss is a mean over (LM: target tokens; RM: prompts with a pair). A ``model``
    argument is the DeepSpeed-wrapped model (:mod:`trainers.runtime.zero`), or a plain transformers model.
    """

    units_name: str = "units"
    """Metric name of the step's global unit count (``target_tokens``, ``prompts``)."""

    def __init__(self, model: ModelConfig, stage_cfg: TrainStageConfig, tokenizer):
        self.model_cfg = model
        """The ``model`` config section (what to build)."""
        self.stage_cfg = stage_cfg
        """The stage's config section (seed, batch sizes, RM normalisation...)."""
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

    def loss(self, model, batch: dict, num_units: float) -> tuple[torch.Tensor, dict[str, float]]:
        """``(sum over the batch's units / num_units, extra summable stats)``."""
        raise NotImplementedError

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Extra per-step metrics from the all-reduced stats (e.g. RM accuracy)."""
        return {}

    def eval_sums(self, model, batch: dict) -> dict[str, float]:
        """Summable evaluation statistics of one validation batch (no grad)."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics (``valid_loss``...) from all-reduced sums."""
        raise NotImplementedError

    def finish(self, model, data: PreparedData, shape: tuple) -> tuple[dict, dict]:
        """After training (collective; ``shape`` = (rank, world)): ``(config updates for the saved
        model, extra summary metrics)``."""
        return {}, {}
