"""Stage 2, reward model: learn the labelers' rankings of K responses per prompt.

    rlhf rm --config trainers/configs/tiny.yaml data.dir=/tmp/world model.path=runs/sft/model --out runs/rm

The model is the SFT trunk with a scalar head (:func:`trainers.runtime.models.build_reward_model`,
docs/ppo_details.md item 10). One batch element is one prompt with **all** its K responses, forwarded once as
K rows (docs/ppo_details.md item 8: K forwards, not C(K,2)*2); the score is read at each row's last real token
(item 7) and :func:`trainers.algos.ranking_loss` forms every pair (better, worse) of the prompt -- ties form
none. The loss is a mean over prompts (each weighs the same whatever its K) across the global batch. Held-out
pairwise accuracy on ``comparisons/valid``.

After training, when ``rm.normalize`` is on (docs/ppo_details.md item 9, InstructGPT 3.5), the mean raw score
of the training demonstrations (a seeded sample of at most :data:`NORMALIZE_MAX_DEMOS`) is measured and
``reward_bias = -mean`` is stored in the saved ``config.json`` (see :mod:`trainers.runtime.models`:
transformers' head has no bias). Summary: ``rm/train_loss``, ``rm/valid_loss``, ``rm/valid_accuracy``,
``rm/demo_mean_score_before`` (raw), ``rm/reward_bias``, ``rm/demo_mean_score_after`` (same demonstrations,
bias added: 0 by construction), ``rm/valid_demo_mean_score`` (``demonstrations/valid`` with the bias: how well
it generalises).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from trainers.algos import ranking_loss
from trainers.config import Config
from trainers.data import kind_paths, read_conversations
from trainers.data.chat import ChatFormat
from trainers.data.collate import collate_rm, left_pad
from trainers.data.examples import Overlong, comparison_examples, report_overlong, where_of
from trainers.data.sharding import eval_batches
from trainers.runtime.dist import all_reduce_sum
from trainers.runtime.models import (
    REWARD_BIAS_KEY,
    build_reward_model,
    check_model_dir,
    reward_bias,
    reward_scores,
)
from trainers.stages.driver import run_stage
from trainers.stages.sft import chat_format, read_demonstrations
from trainers.stages.task import PreparedData, StageSpec, Task

NORMALIZE_MAX_DEMOS = 2048
"""Demonstrations scored to set the reward bias (a seeded sample when there are more)."""


def pair_counts(ranks: torch.Tensor) -> torch.Tensor:
    """``(N,)`` number of ordered pairs (better, worse) per prompt of ``ranks (N, K)`` (-1 = absent)."""
    present = ranks >= 0  # (N, K)
    both = present.unsqueeze(2) & present.unsqueeze(1)  # (N, K, K)
    return (both & (ranks.unsqueeze(2) < ranks.unsqueeze(1))).sum(dim=(1, 2))


class RMTask(Task):
    """Reward-model training: examples are ranked groups; units are prompts with at least one pair."""

    units_name = "prompts"

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The SFT trunk (``model.path``) with a fresh scalar head."""
        m = self.model_cfg
        return build_reward_model(
            m.path,
            self.pad_id,
            dropout=m.dropout,
            dtype=dtype,
            seed=self.stage_cfg.seed,
            trust_remote_code=m.trust_remote_code,
        )

    def collate(self, examples: list) -> dict:
        """``input_ids``/``attention_mask`` (N*Kmax, T) left-padded, ``ranks`` (N, Kmax)."""
        return collate_rm(examples, self.pad_id)

    def units(self, batch: dict) -> int:
        """Prompts with at least one pair (all-tied prompts add nothing to the loss)."""
        return int((pair_counts(batch["ranks"]) > 0).sum())

    def _scores(self, model, batch: dict) -> torch.Tensor:
        """``(N, Kmax)`` scores at the last real token of every response."""
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (N*Kmax,)
        return scores.view(batch["ranks"].shape)  # (N, Kmax)

    def _loss_and_counts(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Summed per-prompt loss and the counts behind the accuracy."""
        ranks = batch["ranks"]
        mean_loss, accuracy = ranking_loss(self._scores(model, batch), ranks)
        n_prompts, n_pairs = self.units(batch), float(pair_counts(ranks).sum())
        counts = {"correct": float(accuracy) * n_pairs, "pairs": n_pairs, "prompts": float(n_prompts)}
        return mean_loss * n_prompts, counts

    def loss(self, model, batch: dict, num_units: float) -> tuple[torch.Tensor, dict]:
        """Sum over prompts of their mean pair loss / ``num_units``; pair counts for the accuracy."""
        loss_sum, counts = self._loss_and_counts(model, batch)
        return loss_sum / num_units, {"correct": counts["correct"], "pairs": counts["pairs"]}

    def train_metrics(self, sums: dict) -> dict:
        """``accuracy``: share of the step's pairs ranked right."""
        return {"accuracy": sums["correct"] / max(sums["pairs"], 1.0)}

    def eval_sums(self, model, batch: dict) -> dict:
        loss_sum, counts = self._loss_and_counts(model, batch)
        return {"loss": float(loss_sum)} | counts

    def eval_metrics(self, sums: dict) -> dict:
        """``valid_loss`` (mean over prompts) and ``valid_accuracy`` (over all pairs)."""
        return {
            "valid_loss": sums["loss"] / max(sums["prompts"], 1.0),
            "valid_accuracy": sums["correct"] / max(sums["pairs"], 1.0),
        }

    def finish(self, model, data: PreparedData, shape: tuple) -> tuple[dict, dict]:
        """Normalise (``rm.normalize``): ``reward_bias = -mean raw score of the demonstrations``."""
        if not self.stage_cfg.normalize:
            return {}, {}
        batch_size = self.stage_cfg.micro_batch_size * 4
        base = reward_bias(model)  # 0.0 for a model this stage built
        before = mean_score(model, data.extra["demos"], self.pad_id, batch_size, shape) - base
        valid = mean_score(model, data.extra["valid_demos"], self.pad_id, batch_size, shape) - base
        bias = -before
        extra = {
            "demo_mean_score_before": before,
            "reward_bias": bias,
            "demo_mean_score_after": before + bias,
            "valid_demo_mean_score": valid + bias,
        }
        return {REWARD_BIAS_KEY: bias}, extra


@torch.no_grad()
def mean_score(model, sequences: list[list[int]], pad_id: int, batch_size: int, shape: tuple) -> float:
    """Mean reward score of ``sequences`` (prompt + response ids), sharded over ranks (collective)."""
    rank, world = shape
    model.eval()
    total, count = 0.0, 0.0
    for indices, counted in eval_batches(len(sequences), batch_size, rank, world):
        input_ids, attention_mask = left_pad([sequences[i] for i in indices], pad_id)  # (B, T)
        scores = reward_scores(model, input_ids.to(model.device), attention_mask.to(model.device))  # (B,)
        if counted:
            total, count = total + float(scores.sum()), count + len(indices)
    total, count = all_reduce_sum([total, count])
    return total / max(count, 1.0)


def read_comparisons(cfg: Config, fmt: ChatFormat, split: str) -> tuple[list, Overlong]:
    """Validated ``comparisons/<split>`` as ``(prompt ids, [response ids] * K, ranking)`` in the model's
    chat format (each response ends with its end-of-turn token, as a sampled one ends with a stop id),
    with ``data.overlong`` applied."""
    paths = kind_paths(cfg.data, "comparisons", split)
    records = read_conversations("comparisons", paths)
    where = where_of(paths, "comparisons", split)
    return comparison_examples(fmt, records, where, cfg.model.max_len, cfg.data.overlong)


def normalization_demos(cfg: Config, fmt: ChatFormat, split: str, limit: int | None) -> list[list[int]]:
    """Token ids of demonstrations to score for the bias (a seeded sample of at most ``limit``)."""
    demos = [ids for ids, _ in read_demonstrations(cfg, fmt, split)[0]]
    if limit is not None and len(demos) > limit:
        demos = random.Random(f"{cfg.rm.seed}:normalize").sample(demos, limit)
    return demos


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """Comparisons (train, valid) and, for normalisation, demonstrations (validated, tokenized)."""
    fmt = chat_format(cfg, tokenizer)
    (train, train_counts), (valid, valid_counts) = (read_comparisons(cfg, fmt, s) for s in ("train", "valid"))
    data = PreparedData(
        train=train,
        valid=valid,
        overlong=report_overlong([train_counts, valid_counts], f"model.max_len={cfg.model.max_len}"),
    )
    if cfg.rm.normalize:
        data.extra["demos"] = normalization_demos(cfg, fmt, "train", NORMALIZE_MAX_DEMOS)
        data.extra["valid_demos"] = normalization_demos(cfg, fmt, "valid", None)
    return data


def check_model(cfg: Config) -> None:
    """The RM starts from a model directory (the SFT model)."""
    check_model_dir(cfg.model.path)


SPEC = StageSpec(name="rm", prepare=prepare, check_model=check_model, task=RMTask)


def run_rm(cfg: Config, out_dir: str | Path, fresh: bool = False) -> dict:
    """Run stage 2 into ``out_dir``; returns the summary (see :func:`trainers.stages.driver.run_stage`)."""
    return run_stage(SPEC, cfg, out_dir, fresh=fresh)
