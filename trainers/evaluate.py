"""Evaluation: generation, win rates under a judge, held-out zero-shot accuracy, pretraining loss.

    from trainers import evaluate as ev
    prompts = ev.read_prompts("world/prompts/test.parquet")
    a = ev.generate("runs/ppo", prompts, max_new_tokens=48, seed=0)
    b = ev.generate("runs/sft", prompts, max_new_tokens=48, seed=0)
    ev.win_rate(prompts, a, b, ev.GoldJudge())          # {'win_rate': 0.61, 'ci_low': ..., ...}
    ev.heldout_accuracy("runs/ppo", "sentiment", "world")  # FLAN-style zero-shot, rank classification
    ev.pretrain_loss("runs/ppo", texts)                  # alignment tax

Importable without Ray, DeepSpeed or vLLM (transformers and vLLM are imported inside the functions
that need them). A *model directory* is a Hugging Face ``save_pretrained`` folder with safetensors
and a tokenizer; a stage's output directory (holding ``model/``) is accepted too
(:func:`resolve_model_dir`).

Decisions:

- **Decoding for evaluation: sampling at T = 1 by default**, seeded. The PPO objective is the
  expected reward of samples drawn at the rollout temperature (``rollout.temperature``, 1.0), and
  InstructGPT's labelers compared sampled outputs at T = 1; greedy decoding would measure a different
  policy (the mode), which for tiny models often loops. ``temperature=0`` gives greedy decoding.
  Sampling is reproducible: the same seed, prompts and batch size give the same outputs.
- **Ties** count half a win. Identical responses to a prompt are a tie without asking the judge
  (a batched forward may differ in the last float bit with the padding around it).
- **Confidence interval**: the 95% Wilson score interval of the tie-as-half score
  ``(wins + ties / 2) / n`` over ``n`` prompts, treating each prompt as one Bernoulli trial. Ties
  have less variance than the coin flip this assumes, so with many ties the interval is
  conservative (wider than needed); it never leaves [0, 1] and is sensible at 0 and 1, unlike the
  normal approximation, and needs no random resampling.
- **Held-out accuracy** (FLAN, Wei et al. 2022): for a prompt with ``OPTIONS`` the model's choice is
  the option with the highest total log-likelihood as the response (rank classification), or with
  ``method="generate"`` the option named first in its greedy response; prompts without options are
  exact match of the greedy response after :func:`normalize_answer`.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from trainers.data import gold
from trainers.data.collate import (
    encode_prompt,
    encode_response,
    encode_text,
    left_pad,
    position_ids_from_mask,
)
from trainers.data.tokenizer import load_tokenizer
from trainers.errors import DataError, UserError
from trainers.runtime.device import resolve_device, resolve_dtype, torch_dtype, vllm_dtype

WILSON_Z = 1.959963984540054
"""z of a two-sided 95% interval."""
DEFAULT_TEMPERATURE = 1.0
"""Evaluation samples at the rollout temperature (see the module docstring); 0 means greedy."""
DEFAULT_PRETRAIN_MAX_LEN = 256
"""Window length of :func:`pretrain_loss`: ``model.max_len``'s default, the pretrain stage's windows."""
BACKENDS = ("hf", "vllm")
HELDOUT_METHODS = ("rank", "generate")
VLLM_CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of an evaluation vLLM engine on CPU (a fraction of host memory fails at start-up)."""


# --------------------------------------------------------------------------------------------------
# Model directories and loading
# --------------------------------------------------------------------------------------------------


def resolve_model_dir(path: str | Path, what: str = "model") -> Path:
    """The model directory for ``path``: ``path/model`` for a stage output directory, else ``path``.

    :func:`trainers.runtime.models.check_model_dir` with a stage output accepted and ``tokenizer.json``
    required; a :class:`~trainers.errors.ConfigError` (one line naming ``what``) when anything is missing.
    """
    from trainers.runtime.models import check_model_dir

    return check_model_dir(path, what, stage_output=True, need_tokenizer=True)


def load_causal_lm(model_dir: str | Path, device: str | None = None):
    """``(model, tokenizer)`` of a causal LM directory, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(model_dir)
    device = device or resolve_device()
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(resolve_dtype("auto", device)), use_safetensors=True
    )
    return model.to(device).eval(), load_tokenizer(path)


def _max_prompt_len(model, max_new_tokens: int) -> int:
    """Longest prompt that leaves room for ``max_new_tokens`` in the model's positions."""
    return int(model.config.max_position_embeddings) - max_new_tokens


def _check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], limit: int) -> None:
    """DataError naming the first prompt that does not fit (with the room left for the response)."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) > limit:
            raise DataError(f"prompt {i} is {len(ids)} tokens long; at most {limit} fit before the response")


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def decode_responses(tok, token_lists: Sequence[Sequence[int]]) -> list[str]:
    """Response texts: each token list cut at its first EOS, special tokens dropped, stripped."""
    texts = []
    for ids in token_lists:
        ids = list(ids)
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
        texts.append(tok.decode(ids, skip_special_tokens=True).strip())
    return texts


def _generation_config(tok, max_new_tokens: int, temperature: float):
    """Plain ancestral sampling at ``temperature`` (no top-k/top-p: the policy's own distribution), or greedy."""
    from transformers import GenerationConfig

    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        do_sample=temperature > 0,
        **sampling,
    )


@torch.no_grad()
def generate_ids_hf(
    model,
    tok,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> list[list[int]]:
    """New token ids per prompt from transformers ``generate`` on LEFT-padded batches with masks.

    Batch ``k`` is sampled after ``torch.manual_seed(seed + k)``, so outputs depend only on the seed,
    the prompts and the batch size. Rows that stopped early are padded after their EOS.
    """
    config = _generation_config(tok, max_new_tokens, temperature)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for k, start in enumerate(range(0, len(prompt_ids), batch_size)):
        input_ids, attention_mask = left_pad(
            prompt_ids[start : start + batch_size], tok.pad_token_id
        )  # (B, P)
        torch.manual_seed(seed + k)
        sequences = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )  # (B, P + R)
        out += sequences[:, input_ids.shape[1] :].tolist()
    return out


def generate_ids_vllm(
    model_dir: Path,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    device: str,
) -> list[list[int]]:
    """New token ids per prompt from an in-process vLLM engine (the rollout actor's class, no Ray).

    Uses :class:`actors.rollout.RolloutEngine` so evaluation starts vLLM exactly as PPO's rollouts do
    (on CPU: in-process ``uni`` executor, a KV cache given in bytes). Request seeds follow
    :func:`actors.rollout.request_seeds`, so outputs do not depend on batching. A script that uses
    this backend on GPU needs an ``if __name__ == "__main__":`` guard (vLLM spawns processes there).
    """
    import gc

    from actors.rollout import RolloutEngine

    kwargs = {"kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES} if device == "cpu" else {}
    engine = RolloutEngine(
        str(model_dir), seed=seed, device=device, dtype=vllm_dtype(resolve_dtype("auto", device)), **kwargs
    )
    try:
        sampling = {"n": 1, "max_new_tokens": max_new_tokens, "temperature": float(temperature)}
        samples = engine.generate([list(p) for p in prompt_ids], sampling, seed=seed)
    finally:
        del engine
        gc.collect()
    return [s["token_ids"] for s in sorted(samples, key=lambda s: s["prompt_index"])]


def _positions_of(model_dir: Path) -> int:
    """``max_position_embeddings`` from a model directory's config (without loading weights)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings)


def generate(
    model_dir: str | Path,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    batch_size: int = 32,
    backend: str = "hf",
    device: str | None = None,
) -> list[str]:
    """One response per prompt from the causal LM in ``model_dir`` (decoded, cut at EOS, stripped).

    ``temperature`` 0 is greedy decoding; > 0 samples from the full distribution at that temperature
    (the default 1.0: see the module docstring). ``backend`` ``hf`` (transformers, left padding) or
    ``vllm`` (in-process engine; starting it costs ~20 s on CPU).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown generation backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    path = resolve_model_dir(model_dir)
    device = device or resolve_device()
    if backend == "vllm":
        tok = load_tokenizer(path)
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
        _check_prompt_lengths(prompt_ids, _positions_of(path) - max_new_tokens)
        ids = generate_ids_vllm(
            path, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, device=device
        )
        return decode_responses(tok, ids)
    model, tok = load_causal_lm(path, device)
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    _check_prompt_lengths(prompt_ids, _max_prompt_len(model, max_new_tokens))
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    ids = generate_ids_hf(model, tok, prompt_ids, batch_size=batch_size, **sampling)
    return decode_responses(tok, ids)


# --------------------------------------------------------------------------------------------------
# Judges and win rates
# --------------------------------------------------------------------------------------------------


class GoldJudge:
    """The synthetic world's hidden gold labeler (:func:`trainers.data.gold.score`) as a judge."""

    name = "gold"

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Gold score in [0, 1] of each response to its prompt."""
        return [gold.score(p, r) for p, r in zip(prompts, responses, strict=True)]


class RewardModelJudge:
    """A trained reward model as a judge: the RM score of ``prompt + response + EOS``.

    The sequence is built as in RM training and PPO (``encode_prompt`` + ``encode_response``), and
    scored through :func:`trainers.runtime.models.reward_scores` (last real token + ``config.reward_bias``).
    """

    def __init__(self, rm_dir: str | Path, *, batch_size: int = 32, device: str | None = None):
        path = resolve_model_dir(rm_dir, what="reward model")  # before the slow transformers import
        from transformers import AutoModelForSequenceClassification

        self.name = f"rm:{path}"
        self.device = device or resolve_device()
        self.batch_size = batch_size
        self.tok = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch_dtype(resolve_dtype("auto", self.device)), use_safetensors=True
        )
        self.model.to(self.device).eval()

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """RM score of each response to its prompt (left-padded batches of ``batch_size``)."""
        from trainers.runtime.models import reward_scores

        seqs = [
            encode_prompt(self.tok, p) + encode_response(self.tok, r)
            for p, r in zip(prompts, responses, strict=True)
        ]
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


def read_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """The ``prompt`` field of a validated prompts file (Parquet or JSONL); the first ``n`` if given."""
    from trainers.data import read_records

    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompts file '{p}' does not exist")
    prompts = [r["prompt"] for r in read_records("prompts", [p])]
    if not prompts:
        raise DataError(f"{p}: no prompts")
    return prompts[:n] if n else prompts


# --------------------------------------------------------------------------------------------------
# Held-out zero-shot accuracy (FLAN)
# --------------------------------------------------------------------------------------------------

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
    from trainers.data import read_records
    from trainers.data.templates import TASKS, clusters

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
    from trainers.algos import logprobs_from_logits, shift_for_lm

    pairs = [
        (i, encode_prompt(tok, prompt), tok.encode(option, add_special_tokens=False))
        for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True))
        for option in opts
    ]
    device = next(model.parameters()).device
    totals: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        input_ids, attention_mask = left_pad([p + o for _, p, o in chunk], tok.pad_token_id)  # (B, T)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits  # (B, T, V)
        logits, labels = shift_for_lm(logits, input_ids)  # (B, T-1, V), (B, T-1)
        logp = logprobs_from_logits(logits, labels)  # (B, T-1)
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
        prompt_ids = [encode_prompt(tok, rows[i]["prompt"]) for i in generated]
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


# --------------------------------------------------------------------------------------------------
# Pretraining loss (alignment tax)
# --------------------------------------------------------------------------------------------------


def text_windows(tok, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """``BOS + text + EOS`` of each text cut into consecutive pieces of at most ``max_len`` tokens.

    The same pieces as the pretrain stage's validation (lone-token pieces dropped: nothing to predict).
    """
    pieces = []
    for text in texts:
        ids = encode_text(tok, text)
        pieces += [
            ids[i : i + max_len] for i in range(0, len(ids), max_len) if len(ids[i : i + max_len]) >= 2
        ]
    return pieces


@torch.no_grad()
def lm_loss_on(model, pieces: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> float:
    """Token-mean next-token loss over all pieces (each piece's first token is context only)."""
    from trainers.algos import logprobs_from_logits, shift_for_lm

    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        input_ids, attention_mask = left_pad(pieces[start : start + batch_size], pad_id)  # (B, T)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits  # (B, T, V)
        logits, labels = shift_for_lm(logits, input_ids)  # (B, T-1, V), (B, T-1)
        target = (
            attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        )  # (B, T-1): real token, real context
        logp = logprobs_from_logits(logits, labels)  # (B, T-1)
        # where, not a product: a padding row's log-prob may be nan, and nan * 0 is nan.
        nll_sum += float(-torch.where(target, logp, torch.zeros_like(logp)).sum())
        count += int(target.sum())
    return nll_sum / max(1, count)


def pretrain_loss(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    max_len: int = DEFAULT_PRETRAIN_MAX_LEN,
    batch_size: int = 16,
    device: str | None = None,
) -> float:
    """Token-mean LM loss (nats) of the model on pretraining ``texts`` (e.g. ``pretrain/valid``).

    Compare base, SFT, PPO and PPO-ptx with the same texts and ``max_len`` for the alignment tax.
    """
    if not texts:
        raise DataError("pretraining loss of zero texts")
    model, tok = load_causal_lm(model_dir, device)
    return lm_loss_on(model, text_windows(tok, texts, max_len), tok.pad_token_id, batch_size)


def read_texts(path: str | Path) -> list[str]:
    """The ``text`` field of a validated pretraining file."""
    from trainers.data import read_records

    p = Path(path)
    if not p.is_file():
        raise DataError(f"pretraining file '{p}' does not exist")
    return [r["text"] for r in read_records("pretrain", [p])]
