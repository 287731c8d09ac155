"""The description of a stage run that the driver builds once and every worker receives.

Built by :func:`make_plan` after validation; Ray Train hands it to each worker as ``train_loop_config``.
Workers run in a trial folder of their own, so every path in it is absolute.
"""

from __future__ import annotations

from pathlib import Path

from trainers.config import Config, to_dict, tokenizer_dir
from trainers.stages.task import StageSpec


def stage_config(cfg: Config, stage: str):
    """The stage's section of the config (``cfg.pretrain`` / ``cfg.sft`` / ``cfg.rm``)."""
    return getattr(cfg, stage)


def make_plan(
    spec: StageSpec, cfg: Config, out: Path, steps: tuple[int, int, int], device: str, dtype: str
) -> dict:
    """The picklable description of the run that every worker receives as ``train_loop_config``."""
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
