"""What the GPU tests share: Qwen2.5-0.5B-shaped model directories built here, log-probs by transformers, and
the results file the device check brings back.

Nothing is downloaded: :func:`build_policy_dir` is :func:`tests.chat_models.build_qwen_like` with the
``qwen2.5-0.5b`` preset (24 layers, hidden 896, 14 heads, 2 KV heads, Qwen's 151,936 vocabulary rows, tied
embeddings, bfloat16, random weights; ~20 s on CPU); :func:`build_reward_dir` puts a fresh scalar head on it
as the RM stage would (``trainers.runtime.models.build_reward_model``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

QWEN_VOCAB = 151936
"""Qwen2.5's embedding rows (only the first ~1,030 are the test tokenizer's)."""
RESULTS_ENV = "RLHF_GPU_RESULTS"
"""Folder where each GPU test writes what it measured (``<test>.json``); unset: nothing is written."""


def build_policy_dir(out: Path, seed: int = 0) -> Path:
    """A Qwen2.5-0.5B-shaped chat model directory (tokenizer, chat template, bf16 random weights) in ``out``."""
    from tests.chat_models import build_qwen_like, world_texts

    return build_qwen_like(out, world_texts(), seed=seed, preset="qwen2.5-0.5b", vocab_size=QWEN_VOCAB)


def build_reward_dir(policy_dir: Path, out: Path) -> Path:
    """An RM directory from ``policy_dir``: its trunk, a fresh score head, ``reward_bias`` 0, its tokenizer."""
    from transformers import AutoTokenizer

    from trainers.runtime.models import build_reward_model

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    model = build_reward_model(policy_dir, tok.pad_token_id, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(policy_dir / name, out / name)
    return out


def write_prompts(data_dir: Path, n: int = 64, seed: int = 0) -> Path:
    """``prompts/train.jsonl`` of ``n`` one-turn prompts of the synthetic world (TRL ``messages`` records)."""
    from trainers.data.world_text import sample_prompt, sample_task

    rng = random.Random(seed)
    path = data_dir / "prompts" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": sample_prompt(sample_task(rng), rng)}]} for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


def start_engine(ray, policy_dir: Path, kv_cache_bytes: int, **options):
    """A :class:`actors.rollout.RolloutEngine` actor on a GPU of its own Ray bundle, serving ``policy_dir``
    as the GPU tests run it (bf16, eager, a fixed KV cache, 1,024 positions); ``options`` go to the engine
    (e.g. ``enable_sleep_mode=True``). Returns the handle at once; its first call waits for the start."""
    from actors.rollout import RolloutEngine

    return (
        ray.remote(RolloutEngine)
        .options(num_gpus=1, num_cpus=1)
        .remote(
            str(policy_dir),
            seed=0,
            device="cuda",
            dtype="bfloat16",
            kv_cache_memory_bytes=kv_cache_bytes,
            max_model_len=1024,
            enforce_eager=True,
            **options,
        )
    )


def load_model(model_dir: Path, device: str = "cuda"):
    """The causal LM of ``model_dir`` in bfloat16 on ``device``, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    return model.to(device).eval()


@torch.no_grad()
def sharpen(model, factor: float = 8.0) -> None:
    """Scale the (tied) embedding: the random model's near-uniform next-token distributions get sharp, so
    log-probs differ by nats from the original's and a missed or partial weight update shows."""
    model.get_input_embeddings().weight.mul_(factor)


@torch.no_grad()
def hf_logprobs(model, sequences: list[list[int]]) -> list[list[float]]:
    """Log-prob of tokens 1..L-1 of each sequence given its prefix, at temperature 1 (float32 log-softmax of
    the model's logits): what :meth:`actors.rollout.RolloutEngine.prompt_logprobs` returns."""
    out = []
    device = next(model.parameters()).device
    for seq in sequences:
        ids = torch.tensor([seq], device=device)  # (1, L)
        logits = model(ids).logits[0, :-1].float()  # (L-1, V)
        out.append(logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return out


def random_sequences(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id lists of ``length`` ids drawn from ``[0, vocab)``."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def mean_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean absolute difference of two nested lists of the same shape."""
    flat = [abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(flat) / len(flat)


def record(name: str, values: dict) -> None:
    """Write what a test measured to ``$RLHF_GPU_RESULTS/<name>.json`` (the device check's results)."""
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
