"""Stage 0, pretraining: next-token prediction on the pretraining corpus.

    rlhf pretrain --config trainers/configs/tiny.yaml data.dir=/tmp/world --out runs/base

The demo's base model is pretrained from scratch (random initialisation from ``model.preset``,
seeded); with ``model.path`` set the same stage continues pretraining a model directory. Every
document is ``BOS + text + EOS``; documents longer than ``model.max_len`` are cut into consecutive
windows of ``max_len`` tokens (pretraining text has no natural unit, so this is not a data error,
unlike an over-long demonstration). Loss: token mean of the cross-entropy over all text tokens of
the global batch; validation loss on ``pretrain/valid``. Summary: ``pretrain/train_loss``,
``pretrain/valid_loss``. This corpus is also PPO-ptx's pretraining distribution.
"""

from __future__ import annotations

from pathlib import Path

from trainers.config import Config
from trainers.data import kind_paths, read_conversations
from trainers.data.collate import text_windows
from trainers.runtime.models import check_model_dir
from trainers.runtime.presets import get_preset
from trainers.stages.driver import run_stage
from trainers.stages.sft import LMTask
from trainers.stages.task import PreparedData, StageSpec


def pretrain_examples(cfg: Config, tokenizer, split: str) -> list[tuple[list[int], int]]:
    """Validated ``pretrain/<split>`` as ``(ids, 0)`` examples: windows of at most ``model.max_len`` tokens
    (:func:`trainers.data.collate.text_windows`)."""
    records = read_conversations("pretrain", kind_paths(cfg.data, "pretrain", split))
    return [(ids, 0) for ids in text_windows(tokenizer, [r["text"] for r in records], cfg.model.max_len)]


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """Training and validation text (validated and tokenized on the driver)."""
    return PreparedData(
        train=pretrain_examples(cfg, tokenizer, "train"), valid=pretrain_examples(cfg, tokenizer, "valid")
    )


def check_model(cfg: Config) -> None:
    """A model directory (continued pretraining) or a known preset (from scratch)."""
    if cfg.model.path:
        check_model_dir(cfg.model.path)
    else:
        get_preset(cfg.model.preset)


SPEC = StageSpec(name="pretrain", prepare=prepare, check_model=check_model, task=LMTask)


def run_pretrain(cfg: Config, out_dir: str | Path, fresh: bool = False) -> dict:
    """Run stage 0 into ``out_dir``; returns the summary (see :func:`trainers.stages.driver.run_stage`)."""
    return run_stage(SPEC, cfg, out_dir, fresh=fresh)
