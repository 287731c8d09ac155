"""Judges and win rates: the synthetic world's gold labeler or a trained reward model compares two models'
responses prompt by prompt; ties count half; a Wilson 95% interval (docs/design.md, "Evaluation").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from trainers.data import gold
from trainers.data.chat import as_messages, open_chat_format
from trainers.data.collate import left_pad
from trainers.data.tokenizer import load_tokenizer
from trainers.errors import DataError, UserError
from trainers.evaluation.generation import resolve_model_dir
from trainers.runtime.device import resolve_device, resolve_dtype, torch_dtype
from trainers.runtime.models import reward_scores

WILSON_Z = 1.959963984540054
"""z of a two-sided 95% interval."""


class GoldJudge:
    """The synthetic world's hidden gold labeler (:func:`trainers.data.gold.score`) as a judge."""

    name = "gold"

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Gold score in [0, 1] of each response to its prompt."""
        return [gold.score(p, r) for p, r in zip(prompts, responses, strict=True)]


class RewardModelJudge:
    """A trained reward model as a judge: the RM score of the prompt and the response in the model's chat
    template, the response ending with its end-of-turn token.

    The sequence is built as in RM training and PPO (:meth:`trainers.data.chat.ChatFormat.reply_ids`), and
    scored through :func:`trainers.runtime.models.reward_scores` (last real token + ``config.reward_bias``).
    """

    def __init__(self, rm_dir: str | Path, *, batch_size: int = 32, device: str | None = None):
        path = resolve_model_dir(rm_dir, what="reward model")  # before the slow transformers import
        from transformers import AutoModelForSequenceClassification

        self.name = f"rm:{path}"
        self.device = device or resolve_device()
        self.batch_size = batch_size
        self.tok = load_tokenizer(path)
        self.fmt = open_chat_format(self.tok, path, path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch_dtype(resolve_dtype("auto", self.device)), use_safetensors=True
        )
        self.model.to(self.device).eval()

    @torch.no_grad()
    def scores(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        """RM score of each response to its prompt (a string or messages; left-padded batches of
        ``batch_size``)."""
        pairs = [self.fmt.reply_ids(as_messages(p), r) for p, r in zip(prompts, responses, strict=True)]
        seqs = [prompt + reply for prompt, reply in pairs]
        out: list[float] = []
        for start in range(0, len(seqs), self.batch_size):
            input_ids, attention_mask = left_pad(
                seqs[start : start + self.batch_size], self.tok.pad_token_id
            )  # (B, T)
            scores = reward_scores(
                self.model, input_ids.to(self.device), attention_mask.to(self.device)
            )  # (B,)
            out += scores.float().cpu().tolist()
        return out


def make_judge(spec: str, **kwargs):
    """``gold`` -> :class:`GoldJudge`; ``rm:DIR`` -> :class:`RewardModelJudge`; UserError otherwise."""
    if spec == "gold":
        return GoldJudge()
    if spec.startswith("rm:") and len(spec) > 3:
        return RewardModelJudge(spec[3:], **kwargs)
    raise UserError(f"unknown judge {spec!r}; use 'gold' or 'rm:DIR' (a reward model directory)")


def wilson_interval(successes: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may be fractional)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome(score_a: float, score_b: float) -> float:
    """1 if A's score is higher, 0 if lower, 0.5 on equal scores."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def win_rate_from_outcomes(outcomes: Sequence[float]) -> dict:
    """``win_rate`` (ties as half), counts, ``n`` and the Wilson 95% CI from per-prompt outcomes."""
    n = len(outcomes)
    if n == 0:
        raise DataError("win rate of zero prompts: give at least one prompt")
    wins = sum(o == 1.0 for o in outcomes)
    losses = sum(o == 0.0 for o in outcomes)
    ties = n - wins - losses
    score = wins + 0.5 * ties
    low, high = wilson_interval(score, n)
    return {
        "win_rate": score / n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
        "ci_low": low,
        "ci_high": high,
    }


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], judge) -> dict:
    """How often the judge prefers A's response over B's, prompt by prompt (ties = half a win).

    ``judge.scores(prompts, responses) -> list[float]`` (higher is better). Returns ``win_rate``,
    ``wins``, ``ties``, ``losses``, ``n``, ``ci_low``, ``ci_high`` (Wilson 95%, module docstring),
    and the mean judge score of each side (``score_a``, ``score_b``).
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(
            f"lengths differ: {len(prompts)} prompts, {len(responses_a)} A, {len(responses_b)} B"
        )
    scores_a = judge.scores(prompts, responses_a)
    scores_b = judge.scores(prompts, responses_b)
    outcomes = [
        0.5 if a_text == b_text else outcome(a, b)
        for a, b, a_text, b_text in zip(scores_a, scores_b, responses_a, responses_b, strict=True)
    ]
    result = win_rate_from_outcomes(outcomes)
    result["score_a"] = statistics.fmean(scores_a)
    result["score_b"] = statistics.fmean(scores_b)
    return result


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> dict:
    """Mean gold score and the mean of every gold criterion (``closing`` = closing rate) over responses."""
    if not prompts:
        raise DataError("gold scores of zero prompts: give at least one prompt")
    pairs = list(zip(prompts, responses, strict=True))
    per_criterion = [gold.criteria(p, r) for p, r in pairs]
    out = {"n": len(pairs), "score": statistics.fmean(gold.score(p, r) for p, r in pairs)}
    for key in per_criterion[0]:
        out[key] = statistics.fmean(c[key] for c in per_criterion)
    out["empty_rate"] = statistics.fmean(float(not r.strip()) for _, r in pairs)
    return out
