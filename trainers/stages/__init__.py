"""Stages 0-2 of InstructGPT on Ray Train with DeepSpeed ZeRO-3: pretrain, SFT, reward model.

    from trainers.config import load_config
    from trainers.stages import run_pretrain, run_sft, run_rm

    cfg = load_config("trainers/configs/tiny.yaml", ["data.dir=/tmp/world"])
    run_pretrain(cfg, "runs/base")
    run_sft(load_config(..., ["model.path=runs/base/model", ...]), "runs/sft")

or from the shell: ``rlhf pretrain|sft|rm --config FILE [key=value ...] --out DIR [--fresh]``.
The shared machinery (validation, driver, worker loop, resume) is in :mod:`trainers.stages.common`.
"""

from __future__ import annotations

import importlib

_MODULES = {"pretrain": "trainers.stages.pretrain", "sft": "trainers.stages.sft", "rm": "trainers.stages.rm"}


def get_spec(name: str):
    """The :class:`~trainers.stages.common.StageSpec` of stage ``name`` (``pretrain``, ``sft``, ``rm``)."""
    return importlib.import_module(_MODULES[name]).SPEC


def run_pretrain(cfg, out_dir, fresh: bool = False, **kwargs) -> dict:
    """Stage 0: next-token prediction on ``pretrain/train`` (see :mod:`trainers.stages.pretrain`)."""
    from trainers.stages.pretrain import run_pretrain as run

    return run(cfg, out_dir, fresh=fresh, **kwargs)


def run_sft(cfg, out_dir, fresh: bool = False, **kwargs) -> dict:
    """Stage 1: supervised fine-tuning on demonstrations (see :mod:`trainers.stages.sft`)."""
    from trainers.stages.sft import run_sft as run

    return run(cfg, out_dir, fresh=fresh, **kwargs)


def run_rm(cfg, out_dir, fresh: bool = False, **kwargs) -> dict:
    """Stage 2: reward model on K-way rankings (see :mod:`trainers.stages.rm`)."""
    from trainers.stages.rm import run_rm as run

    return run(cfg, out_dir, fresh=fresh, **kwargs)


__all__ = ["get_spec", "run_pretrain", "run_rm", "run_sft"]
