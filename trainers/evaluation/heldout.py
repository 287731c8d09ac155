"""Held-out zero-shot accuracy (FLAN, Wei et al. 2022) on a task cluster left out of SFT and RM data.

For a prompt with ``OPTIONS`` the model's choice is the option with the highest total log-likelihood as
the response (rank classification), or with ``method="generate"`` the option named first in its greedy
response; prompts without options are exact match of the greedy response after :func:`normalize_answer`.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from trainers.data import gold, read_records
from trainers.data.chat import ChatFormat, user_turn
from trainers.data.templates import TASKS, clusters
from trainers.errors import DataError, UserError
from trainers.evaluation.generation import (
    _check_prompt_lengths,
    _max_prompt_len,
    decode_responses,
    generate_ids_hf,
    load_causal_lm,
)
from trainers.evaluation.lm_loss import next_token_logprobs

HELDOUT_METHODS = ("rank", "generate")

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, the labelers' closing removed, punctuation and articles dropped, spaces collapsed."""
    body, _ = gold.strip_closing(text)
    words = re.sub(r"[^\w\s]", " ", body.lower())
    return " ".join(_ARTICLES.sub(" ", words).split())


def match_option(response: str, options: Sequence[str]) -> str | None:
    """The option a free-text response names: the one whose words occur earliest (None if none does)."""
    text = f" {normalize_answer(response)} "
    found = []
    for option in options:
        key = normalize_answer(option)
        at = text.find(f" {key} ") if key else -1
        if at >= 0:
            found.append((at, -len(key), option))  # earliest; on the same spot the longer option
    return min(found)[2] if found else None


def is_correct(prediction: str | None, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` (a missing prediction is wrong)."""
    return prediction is not None and normalize_answer(prediction) == normalize_answer(answer)


def accuracy_breakdown(rows: Sequence[dict], predictions: Sequence[str | None]) -> dict:
    """``accuracy``, ``n``, ``chance`` (1/#options, 0 for open answers) and ``per_task`` of predictions."""
    if not rows:
        raise DataError("accuracy of zero rows")
    per_task: dict[str, list[float]] = {}
    chance = []
    for row, pred in zip(rows, predictions, strict=True):
        per_task.setdefault(row["task"], []).append(float(is_correct(pred, row["answer"])))
        chance.append(1.0 / len(row["options"]) if row.get("options") else 0.0)
    correct = [c for values in per_task.values() for c in values]
    return {
        "accuracy": statistics.fmean(correct),
        "n": len(correct),
        "chance": statistics.fmean(chance),
        "per_task": {t: {"accuracy": statistics.fmean(v), "n": len(v)} for t, v in sorted(per_task.items())},
    }


def heldout_file(data: str | Path) -> Path:
    """``DIR/heldout/test.parquet`` for a data directory, or the file itself; DataError if missing."""
    p = Path(data)
    path = p / "heldout" / "test.parquet" if p.is_dir() else p
    if not path.is_file():
        raise DataError(f"held-out file '{path}' does not exist (run `rlhf data synth` or give a file)")
    return path


def load_heldout(cluster: str, data: str | Path) -> list[dict]:
    """Validated rows of ``cluster`` that have an ``answer`` (``task`` filled in from the prompt if absent).

    Unknown cluster, missing file, bad rows or no usable row are :class:`UserError` s (before any model
    is loaded).
    """
    known = clusters()
    if cluster not in known:
        raise UserError(f"unknown task cluster {cluster!r}; valid clusters: {', '.join(known)}")
    path = heldout_file(data)
    rows = []
    for row in read_records("prompts", [path]):
        task = row.get("task")
        if task is None:
            parsed = gold.parse_prompt(row["prompt"])
            task = parsed.task.name if parsed else None
        if task in TASKS and TASKS[task].cluster == cluster and row.get("answer") is not None:
            rows.append({**row, "task": task})
    if not rows:
        raise DataError(f"{path}: no rows of cluster '{cluster}' with an answer")
    return rows


@torch.no_grad()
def option_logprobs(
    model, tok, prompts: Sequence[str], options: Sequence[Sequence[str]], batch_size: int = 64
) -> list[list[float]]:
    """Total log-likelihood of each option as the response to its prompt (no EOS), per prompt.

    Rows ``prompt + option`` are scored in left-padded batches with mask-derived positions; the sum
    runs over the option's tokens only. Returns one list per prompt, in option order.
    """
    fmt = ChatFormat.from_tokenizer(tok)
    pairs = [
        (i, fmt.prompt_ids(user_turn(prompt)), tok.encode(option, add_special_tokens=False))
        for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True))
        for option in opts
    ]
    totals: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        logp, _ = next_token_logprobs(model, [p + o for _, p, o in chunk], tok.pad_token_id)  # (B, T-1)
        for row, (_, _, option) in enumerate(chunk):
            totals.append(float(logp[row, logp.shape[1] - len(option) :].sum()))  # the option is at the end
    out: list[list[float]] = [[] for _ in prompts]
    for (i, _, _), total in zip(pairs, totals, strict=True):
        out[i].append(total)
    return out


def heldout_predictions(
    model, tok, rows: Sequence[dict], *, method: str, max_new_tokens: int, batch_size: int
):
    """The model's answer per row: rank classification / generated option for OPTIONS rows, else text."""
    predictions: list[str | None] = [None] * len(rows)
    ranked = [i for i, r in enumerate(rows) if r.get("options") and method == "rank"]
    if ranked:
        scores = option_logprobs(
            model, tok, [rows[i]["prompt"] for i in ranked], [rows[i]["options"] for i in ranked], batch_size
        )
        for i, row_scores in zip(ranked, scores, strict=True):
            predictions[i] = rows[i]["options"][max(range(len(row_scores)), key=row_scores.__getitem__)]
    done = set(ranked)
    generated = [i for i in range(len(rows)) if i not in done]
    if generated:
        fmt = ChatFormat.from_tokenizer(tok)
        prompt_ids = [fmt.prompt_ids(user_turn(rows[i]["prompt"])) for i in generated]
        _check_prompt_lengths(prompt_ids, _max_prompt_len(model, max_new_tokens))
        ids = generate_ids_hf(
            model,
            tok,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            seed=0,
            batch_size=batch_size,
        )
        for i, text in zip(generated, decode_responses(tok, ids), strict=True):
            options = rows[i].get("options")
            predictions[i] = match_option(text, options) if options else text
    return predictions


def heldout_accuracy(
    model_dir: str | Path,
    cluster: str,
    data: str | Path,
    *,
    method: str = "rank",
    max_new_tokens: int = 16,
    batch_size: int = 64,
    device: str | None = None,
) -> dict:
    """Zero-shot accuracy of a model on the held-out task ``cluster`` (FLAN-style; module docstring).

    ``data`` is a data directory (``DIR/heldout/test.parquet``) or a prompts file with ``task``,
    ``options`` and ``answer``. Returns ``accuracy``, ``n``, ``chance``, ``per_task``, ``cluster``,
    ``method``.
    """
    if method not in HELDOUT_METHODS:
        raise UserError(f"unknown held-out method {method!r}; valid: {', '.join(HELDOUT_METHODS)}")
    rows = load_heldout(cluster, data)
    model, tok = load_causal_lm(model_dir, device)
    predictions = heldout_predictions(
        model, tok, rows, method=method, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return {**accuracy_breakdown(rows, predictions), "cluster": cluster, "method": method}
