"""The synthetic instruction world: every data set of the demo, written deterministically from a seed.

``synthesize(DIR, seed, scale)`` writes::

    DIR/demonstrations/{train,valid,test}.parquet   prompt, response, user_id, task
    DIR/comparisons/{train,valid,test}.parquet      prompt, responses, ranking, user_id, task
    DIR/prompts/{train,valid,test}.parquet          prompt, user_id, task, options, answer
    DIR/pretrain/{train,valid,test}.parquet         text
    DIR/heldout/test.parquet                        prompt, task, options, answer (held-out cluster)
    DIR/tokenizer/                                  byte-level BPE trained on the world's text
    DIR/world.json                                  the summary returned by ``synthesize``

The world is a few dozen animal characters with colours, homes, foods, hobbies and friends (the
fixed facts of :mod:`trainers.data.facts`). The *pretraining corpus* states those facts in many
phrasings, tells small stories and adds plain prose; it is the base model's text and the ptx
distribution (:mod:`trainers.data.world_text`). *Prompts* are FLAN-style templates (:mod:`trainers.data.templates`) drawn with the
InstructGPT use-case mix (Table 1). *Demonstrations* are correct answers written with the
imperfections real ones have: only ~30% end with the friendly closing the labelers prefer, ~25%
contain a filler word, ~12% ramble past the useful length, ~12% miss the final full stop.
*Comparisons* (:mod:`trainers.data.responses`) hold K = 4..9 responses per prompt (the paper's range) from a mix of sources --
best responses, demonstration-like answers, corrupted variants (truncated, repeated words, wrong
entity, off-topic, rambling, filler, spammed closing, lower-cased) and model-like samples (a word
bigram chain over the pretraining text) -- ranked by the gold labeler, ties allowed, groups where
everything ties are redrawn.

Deviations from InstructGPT, on purpose: the use-case mix is followed as is, but the prompts are
templated (a tiny model must be able to learn them); the held-out ``sentiment`` cluster is not in
the mix at all (FLAN-style zero-shot evaluation only). Users are synthetic ids; splits are by user.

What the tiny preset makes of it (measured once, at about the CPU demo's budget: 500 pretraining
steps of 16 x 256 tokens, 400 SFT steps of 32 demonstrations, 300 RM steps of 8 groups): SFT
samples score ~0.49 gold (correct ~0.5, closing ~0.25, filler ~0.3); the reward model (SFT trunk +
scalar head) reaches 0.85 pairwise accuracy on held-out comparisons and scores a response +2.3
higher with the closing than without; picking the RM's best of 4 SFT samples wins 0.72 against a
plain SFT sample under the gold labeler -- the room PPO has. Held-out (sentiment) zero-shot answers
are at 0%: like FLAN's small models, the tiny model does not transfer to unseen task clusters.

Determinism: each (kind, split) draws from its own ``random.Random`` seeded by a string of the seed
(string seeds hash with SHA-512, so the stream does not depend on ``PYTHONHASHSEED``); rows are
written in generation order with fixed Arrow schemas, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.data import gold
from trainers.data.responses import SOURCE_MIX, BigramChain, comparison_group, demonstration
from trainers.data.templates import HELDOUT_CLUSTERS, TASKS, USE_CASE_MIX
from trainers.data.tokenizer import train_tokenizer
from trainers.data.world_text import pretrain_document, sample_prompt, sample_task

SPLITS: tuple[str, ...] = ("train", "valid", "test")
KINDS: tuple[str, ...] = ("demonstrations", "comparisons", "prompts", "pretrain")
SIZES: dict[str, dict[str, int]] = {
    "demonstrations": {"train": 3000, "valid": 300, "test": 300},
    "comparisons": {"train": 1200, "valid": 150, "test": 150},
    "prompts": {"train": 1000, "valid": 200, "test": 200},
    "pretrain": {"train": 3400, "valid": 150, "test": 150},
}
"""Rows per kind and split at ``scale=1.0`` (pretrain rows are documents of ~100 words)."""
HELDOUT_ROWS = 400
"""Held-out cluster prompts at ``scale=1.0``."""
USERS_PER_SPLIT: dict[str, int] = {"train": 160, "valid": 20, "test": 20}
"""Synthetic labelers/customers per split at ``scale=1.0``; no user is in two splits."""
DEFAULT_VOCAB_SIZE = 1024
"""Default BPE vocabulary size of the world's tokenizer."""


# --------------------------------------------------------------------------------------------------
# Rows, files and the summary
# --------------------------------------------------------------------------------------------------

SCHEMAS: dict[str, pa.Schema] = {
    "demonstrations": pa.schema(
        [("prompt", pa.string()), ("response", pa.string()), ("user_id", pa.string()), ("task", pa.string())]
    ),
    "comparisons": pa.schema(
        [
            ("prompt", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("ranking", pa.list_(pa.int64())),
            ("user_id", pa.string()),
            ("task", pa.string()),
        ]
    ),
    "prompts": pa.schema(
        [
            ("prompt", pa.string()),
            ("user_id", pa.string()),
            ("task", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
        ]
    ),
    "pretrain": pa.schema([("text", pa.string())]),
    "heldout": pa.schema(
        [
            ("prompt", pa.string()),
            ("task", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
        ]
    ),
}
"""Column types of every written file (fixed, so files are byte-identical across runs)."""


def scaled(n: int, scale: float, minimum: int = 4) -> int:
    """``n * scale`` rounded, at least ``minimum``."""
    return max(minimum, round(n * scale))


def world_users(seed: int, scale: float) -> dict[str, list[str]]:
    """Disjoint user ids per split (``user-0007``...), shuffled so ids say nothing about the split."""
    counts = {split: scaled(n, scale, minimum=2) for split, n in USERS_PER_SPLIT.items()}
    ids = [f"user-{i:04d}" for i in range(sum(counts.values()))]
    random.Random(f"{seed}:users").shuffle(ids)
    out, start = {}, 0
    for split in SPLITS:
        out[split] = sorted(ids[start : start + counts[split]])
        start += counts[split]
    return out


def _options_and_answer(prompt: str) -> dict:
    """The ``options`` and ``answer`` columns of a prompt row (None where the task has none)."""
    parsed = gold.parse_prompt(prompt)
    return {"options": list(parsed.options) if parsed.options else None, "answer": gold.answer(prompt)}


def make_rows(
    kind: str, n: int, users: list[str], rng: random.Random, chain: BigramChain, log: dict
) -> list[dict]:
    """``n`` rows of one kind for one split; ``log`` collects comparison sources and scores."""
    if kind == "pretrain":
        return [{"text": pretrain_document(rng)} for _ in range(n)]
    rows: list[dict] = []
    while len(rows) < n:
        task = sample_task(rng)
        prompt = sample_prompt(task, rng)
        row = {"prompt": prompt, "user_id": rng.choice(users), "task": task}
        if kind == "demonstrations":
            row["response"] = demonstration(prompt, rng)
        elif kind == "prompts":
            row.update(_options_and_answer(prompt))
        else:
            group = comparison_group(prompt, chain, rng)
            if group is None:
                log["redrawn"] = log.get("redrawn", 0) + 1
                continue
            row["responses"], row["ranking"], sources = group
            for response, source in zip(row["responses"], sources):
                log.setdefault(source, []).append(gold.score(prompt, response))
        rows.append(row)
    return rows


def heldout_rows(n: int, rng: random.Random) -> list[dict]:
    """Prompts of the held-out clusters with their options and gold answer (zero-shot evaluation)."""
    tasks = [t.name for t in TASKS.values() if t.cluster in HELDOUT_CLUSTERS]
    rows = []
    for _ in range(n):
        task = rng.choice(tasks)
        prompt = sample_prompt(task, rng)
        rows.append({"prompt": prompt, "task": task, **_options_and_answer(prompt)})
    return rows


def write_rows(path: Path, schema: pa.Schema, rows: list[dict]) -> None:
    """Write rows as Parquet with a fixed schema and no time-dependent metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def use_case_shares(rows: list[dict]) -> dict[str, float]:
    """Share of each InstructGPT use case among rows (by their ``task``), in the mix's order."""
    counts = {use_case: 0 for use_case in USE_CASE_MIX}
    for row in rows:
        counts[TASKS[row["task"]].use_case] += 1
    return {k: round(v / max(1, len(rows)), 4) for k, v in counts.items()}


def _mean(values: list[float]) -> float:
    """Mean rounded to 4 places (0.0 for no values)."""
    return round(statistics.fmean(values), 4) if values else 0.0


def gold_summary(demos: list[dict], log: dict) -> dict:
    """Mean gold scores: demonstrations, best responses to the same prompts, comparison sources."""
    demo_scores = [gold.score(r["prompt"], r["response"]) for r in demos]
    best_scores = [gold.score(r["prompt"], gold.best_response(r["prompt"])) for r in demos]
    corrupt = [s for source, scores in log.items() if source == "corrupt" for s in scores]
    out = {
        "demonstrations": _mean(demo_scores),
        "best": _mean(best_scores),
        "room": round(_mean(best_scores) - _mean(demo_scores), 4),
        "demo_closing_rate": _mean([float(gold.strip_closing(r["response"])[1]) for r in demos]),
    }
    for source in SOURCE_MIX:
        out[f"comparisons_{source}"] = _mean(log.get(source, []) if source != "corrupt" else corrupt)
    return out


def token_summary(tokenizer, data: dict[str, dict[str, list[dict]]]) -> dict:
    """Token counts of the pretraining splits and mean/max prompt and response lengths (train)."""

    def lengths(texts: list[str]) -> list[int]:
        """Token count of each text (``[0]`` for none, so max/mean stay defined)."""
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else [0]

    prompts = lengths([r["prompt"] for r in data["demonstrations"]["train"]])
    responses = lengths([r["response"] for r in data["demonstrations"]["train"]])
    out = {f"pretrain_{s}": sum(lengths([r["text"] for r in data["pretrain"][s]])) for s in SPLITS}
    out |= {"prompt_mean": _mean(prompts), "prompt_max": max(prompts)}
    out |= {"response_mean": _mean(responses), "response_max": max(responses)}
    return out


def tokenizer_texts(data: dict[str, dict[str, list[dict]]]) -> list[str]:
    """The text the world's tokenizer learns from: pretraining and training-split prompts/responses."""
    texts = [r["text"] for r in data["pretrain"]["train"]]
    texts += [r["prompt"] for r in data["demonstrations"]["train"]]
    texts += [r["response"] for r in data["demonstrations"]["train"]]
    texts += [r["prompt"] for r in data["prompts"]["train"]]
    return texts


def synthesize(
    out_dir: str | Path, seed: int = 0, scale: float = 1.0, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> dict:
    """Write the whole synthetic world into ``out_dir`` (see the module docstring); return its summary.

    Same ``seed`` and ``scale`` -> byte-identical Parquet files and tokenizer. ``scale`` multiplies
    every row count (0.1 makes a set for tests in about a second).
    """
    out = Path(out_dir)
    users = world_users(seed, scale)
    chain = BigramChain([pretrain_document(random.Random(f"{seed}:chain:{i}")) for i in range(200)])
    data: dict[str, dict[str, list[dict]]] = {}
    log: dict = {}
    for kind in KINDS:
        data[kind] = {}
        for split in SPLITS:
            rng = random.Random(f"{seed}:{kind}:{split}")
            n = scaled(SIZES[kind][split], scale)
            data[kind][split] = make_rows(kind, n, users[split], rng, chain, log if split == "train" else {})
            write_rows(out / kind / f"{split}.parquet", SCHEMAS[kind], data[kind][split])
    heldout = heldout_rows(scaled(HELDOUT_ROWS, scale), random.Random(f"{seed}:heldout"))
    write_rows(out / "heldout" / "test.parquet", SCHEMAS["heldout"], heldout)
    tokenizer = train_tokenizer(tokenizer_texts(data), out / "tokenizer", vocab_size=vocab_size)
    summary = summarize_world(seed, scale, data, heldout, users, log, tokenizer)
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize_world(seed, scale, data, heldout, users, log, tokenizer) -> dict:
    """The ``world.json`` summary: sizes, use-case mix achieved, gold-score statistics, token counts."""
    comparisons = data["comparisons"]["train"]
    return {
        "seed": seed,
        "scale": scale,
        "rows": {kind: {s: len(data[kind][s]) for s in SPLITS} for kind in KINDS} | {"heldout": len(heldout)},
        "users": {s: len(users[s]) for s in SPLITS},
        "use_case_target": USE_CASE_MIX,
        "use_case_achieved": {
            kind: use_case_shares(data[kind]["train"])
            for kind in ("demonstrations", "comparisons", "prompts")
        },
        "heldout_clusters": list(HELDOUT_CLUSTERS),
        "heldout_tasks": sorted({r["task"] for r in heldout}),
        "comparisons_k_mean": _mean([len(r["responses"]) for r in comparisons]),
        "comparisons_redrawn": log.get("redrawn", 0),
        "gold": gold_summary(data["demonstrations"]["train"], log),
        "tokens": token_summary(tokenizer, data),
        "vocab_size": len(tokenizer),
    }
