"""Stage 1, supervised fine-tuning: the base model learns the demonstrations' responses.

    rlhf sft --config trainers/configs/tiny.yaml data.dir=/tmp/world model.path=runs/base/model --out runs/sft

Each example is ``BOS + chat-formatted prompt + response + EOS``, left-padded; the loss is the
token mean of the cross-entropy over **response tokens only** (prompt and padding labels are
ignored; the EOS is a target, so the model learns to stop), aggregated over the global batch
(:mod:`trainers.stages.worker`). Cosine LR with warm-up, dropout ``model.dropout`` (InstructGPT used
0.2 on their models), several epochs, validation loss on ``demonstrations/valid`` at each epoch end.
Summary: ``sft/train_loss`` (mean of the last 10 steps), ``sft/valid_loss``.

:class:`LMTask` is the causal-LM part of the worker loop, shared with pretraining.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.algos import lm_loss, shift_for_lm
from trainers.config import Config
from trainers.data import read_records
from trainers.data.collate import IGNORE_INDEX, collate_lm, encode_prompt, encode_response
from trainers.data.io import data_path
from trainers.data.validate import length_problems, raise_if_problems
from trainers.runtime.models import build_causal_lm, check_model_dir, forward_logits
from trainers.stages.driver import run_stage
from trainers.stages.task import PreparedData, StageSpec, Task


class LMTask(Task):
    """Causal-LM training: examples are ``(ids, n_prompt)``; units are target tokens."""

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


def encode_demonstrations(tokenizer, records: list[dict]) -> list[tuple[list[int], int]]:
    """``(prompt ids + response ids, number of prompt ids)`` per demonstration."""
    out = []
    for record in records:
        prompt = encode_prompt(tokenizer, record["prompt"])
        out.append((prompt + encode_response(tokenizer, record["response"]), len(prompt)))
    return out


def read_demonstrations(cfg: Config, tokenizer, split: str) -> list[tuple[list[int], int]]:
    """Validated, tokenized ``demonstrations/<split>``; DataError naming over-long rows."""
    path = data_path(cfg.data.dir, "demonstrations", split)
    examples = encode_demonstrations(tokenizer, read_records("demonstrations", [path]))
    lengths = [len(ids) for ids, _ in examples]
    raise_if_problems(length_problems(lengths, path, cfg.model.max_len, "prompt + response"))
    return examples


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """Training and validation demonstrations (validated and tokenized on the driver)."""
    return PreparedData(
        train=read_demonstrations(cfg, tokenizer, "train"),
        valid=read_demonstrations(cfg, tokenizer, "valid"),
    )


def check_model(cfg: Config) -> None:
    """SFT starts from a model directory (the base model)."""
    check_model_dir(cfg.model.path)


SPEC = StageSpec(name="sft", prepare=prepare, check_model=check_model, task=LMTask)


def run_sft(cfg: Config, out_dir: str | Path, fresh: bool = False) -> dict:
    """Run stage 1 into ``out_dir``; returns the summary (see :func:`trainers.stages.driver.run_stage`)."""
    return run_stage(SPEC, cfg, out_dir, fresh=fresh)
