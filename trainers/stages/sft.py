"""Stage 1, supervised fine-tuning: the base model learns the demonstrations' responses.

    rlhf sft --config trainers/configs/tiny.yaml data.dir=/tmp/world model.path=runs/base/model --out runs/sft

Each example is a conversation in the model's own chat template (:mod:`trainers.data.chat`), left-padded;
the loss is the token mean of the cross-entropy over **reply tokens only** -- the final assistant turn,
or every one with ``sft.assistant_turns=all`` (prompt and padding labels are ignored; the end-of-turn
token is a target, so the model learns to stop), aggregated over the global batch
(:mod:`trainers.stages.worker`). Cosine LR with warm-up, dropout ``model.dropout`` (InstructGPT used
0.2 on their models), several epochs, validation loss on ``demonstrations/valid`` at each epoch end.
Summary: ``sft/train_loss`` (mean of the last 10 steps), ``sft/valid_loss``.

:class:`LMTask` is the causal-LM part of the worker loop, shared with pretraining.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.algos import lm_loss, shift_for_lm
from trainers.config import Config, tokenizer_dir
from trainers.data import kind_paths, read_conversations
from trainers.data.chat import ChatFormat, open_chat_format
from trainers.data.collate import IGNORE_INDEX, collate_lm
from trainers.data.examples import Overlong, demonstration_examples, report_overlong, where_of
from trainers.runtime.models import build_causal_lm, check_model_dir, forward_logits
from trainers.stages.driver import run_stage
from trainers.stages.task import PreparedData, StageSpec, Task


class LMTask(Task):
    """Causal-LM training: examples are ``(ids, n_prompt or target spans)``; units are target tokens."""

    units_name = "target_tokens"

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """From ``model.path`` (SFT, continued pretraining) or randomly from ``model.preset``."""
        m = self.model_cfg
        return build_causal_lm(
            preset=m.preset,
            path=m.path,
            tokenizer=self.tokenizer,
            dropout=m.dropout,
            dtype=dtype,
            seed=self.stage_cfg.seed,
            trust_remote_code=m.trust_remote_code,
        )

    def collate(self, examples: list) -> dict:
        """Left-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding)."""
        return collate_lm(examples, self.pad_id)

    def units(self, batch: dict) -> int:
        """Target tokens: labels that are not ignored."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def _aligned(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, T-1, V), labels (B, T-1))``: position t predicts token t + 1."""
        logits = forward_logits(model, batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        return shift_for_lm(logits, batch["labels"])

    def loss(self, model, batch: dict, num_units: float) -> tuple[torch.Tensor, dict]:
        """Sum of target-token NLL / ``num_units`` (the global-batch normaliser)."""
        logits, labels = self._aligned(model, batch)
        return lm_loss(logits, labels, num_tokens=num_units), {}

    def eval_sums(self, model, batch: dict) -> dict:
        """Summed NLL and target-token count of one validation batch."""
        logits, labels = self._aligned(model, batch)
        return {"nll": float(lm_loss(logits, labels, num_tokens=1.0)), "tokens": float(self.units(batch))}

    def eval_metrics(self, sums: dict) -> dict:
        """``valid_loss``: token-mean NLL over the whole validation set."""
        return {"valid_loss": sums["nll"] / max(sums["tokens"], 1.0)}


def chat_format(cfg: Config, tokenizer) -> ChatFormat:
    """The tokenizer's chat format (its template, stop ids); a DataError naming the tokenizer if unusable."""
    return open_chat_format(tokenizer, tokenizer_dir(cfg), cfg.model.path)


def read_demonstrations(
    cfg: Config, fmt: ChatFormat, split: str
) -> tuple[list[tuple[list[int], list[tuple[int, int]]]], Overlong]:
    """Validated ``demonstrations/<split>`` as ``(ids, target spans)`` in the model's chat format, with
    ``data.overlong`` applied; DataError lines name the rows the template cannot render."""
    paths = kind_paths(cfg.data, "demonstrations", split)
    records = read_conversations("demonstrations", paths)
    return demonstration_examples(
        fmt,
        records,
        where_of(paths, "demonstrations", split),
        cfg.model.max_len,
        cfg.data.overlong,
        all_turns=cfg.sft.assistant_turns == "all",
    )


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """Training and validation demonstrations (validated and tokenized on the driver)."""
    fmt = chat_format(cfg, tokenizer)
    train, train_counts = read_demonstrations(cfg, fmt, "train")
    valid, valid_counts = read_demonstrations(cfg, fmt, "valid")
    return PreparedData(
        train=train,
        valid=valid,
        overlong=report_overlong([train_counts, valid_counts], f"model.max_len={cfg.model.max_len}"),
    )


def check_model(cfg: Config) -> None:
    """SFT starts from a model directory (the base model)."""
    check_model_dir(cfg.model.path)


SPEC = StageSpec(name="sft", prepare=prepare, check_model=check_model, task=LMTask)


def run_sft(cfg: Config, out_dir: str | Path, fresh: bool = False) -> dict:
    """Run stage 1 into ``out_dir``; returns the summary (see :func:`trainers.stages.driver.run_stage`)."""
    return run_stage(SPEC, cfg, out_dir, fresh=fresh)
