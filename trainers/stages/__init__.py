"""Stages 0-2 of InstructGPT on Ray Train with DeepSpeed ZeRO-3: pretrain, SFT, reward model.

    from trainers.config import load_config
    from trainers.stages import run_pretrain, run_sft, run_rm

    cfg = load_config("trainers/configs/tiny.yaml", ["data.dir=/tmp/world"])
    run_pretrain(cfg, "runs/base")
    run_sft(load_config(..., ["model.path=runs/base/model", ...]), "runs/sft")

or from the shell: ``rlhf pretrain|sft|rm --config FILE [key=value ...] --out DIR [--fresh]``.
The shared machinery, one module per part:

- :mod:`~trainers.stages.task`: what a stage is (``StageSpec``: data preparation, model check, ``Task``);
- :mod:`~trainers.stages.driver`: validation, ``run_stage`` (the Ray Train ``TorchTrainer``), the summary;
- :mod:`~trainers.stages.plan`: the description of the run every worker receives;
- :mod:`~trainers.stages.worker`: the worker loop (train step, evaluation, export);
- :mod:`~trainers.stages.batching`: which examples each optimizer step takes;
- :mod:`~trainers.stages.checkpoints`: Ray Train checkpoints (resume point, save, restore).

The stages themselves are :mod:`~trainers.stages.pretrain`, :mod:`~trainers.stages.sft` and
:mod:`~trainers.stages.rm`; :mod:`~trainers.stages.cli` is ``rlhf pretrain|sft|rm``.
"""

from __future__ import annotations


def run_pretrain(cfg, out_dir, fresh: bool = False) -> dict:
    """Stage 0: next-token prediction on ``pretrain/train`` (see :mod:`trainers.stages.pretrain`)."""
    from trainers.stages.pretrain import run_pretrain as run

    return run(cfg, out_dir, fresh=fresh)


def run_sft(cfg, out_dir, fresh: bool = False) -> dict:
    """Stage 1: supervised fine-tuning on demonstrations (see :mod:`trainers.stages.sft`)."""
    from trainers.stages.sft import run_sft as run

    return run(cfg, out_dir, fresh=fresh)


def run_rm(cfg, out_dir, fresh: bool = False) -> dict:
    """Stage 2: reward model on K-way rankings (see :mod:`trainers.stages.rm`)."""
    from trainers.stages.rm import run_rm as run

    return run(cfg, out_dir, fresh=fresh)


__all__ = ["run_pretrain", "run_rm", "run_sft"]
