"""One response per prompt from a model directory: transformers ``generate`` or an in-process vLLM engine.

A *model directory* is a Hugging Face ``save_pretrained`` folder with safetensors and a tokenizer; a
stage's output directory (holding ``model/``) is accepted too (:func:`resolve_model_dir`).

A *prompt* is a string (one user turn) or a conversation (a list of ``{role, content}`` messages); it is
rendered with the model's own chat template (:class:`trainers.data.chat.ChatFormat`), as in training.

Stop ids (docs/ppo_details.md item 28): :func:`generate` stops at the model's stop set
(``ChatFormat.stop_ids``: end-of-turn, EOS, the directory's ``eos_token_id`` lists) unless ``stop_ids`` is
given; it both ends generation (HF ``eos_token_id`` list, vLLM ``stop_token_ids``) and cuts the decoded
text. The lower-level helpers fall back to the tokenizer's ``eos_token_id`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from trainers.data import read_conversations
from trainers.data.chat import ChatFormat, as_messages, open_chat_format, prompt_of
from trainers.data.collate import left_pad
from trainers.data.tokenizer import load_tokenizer
from trainers.errors import DataError, UserError
from trainers.runtime.device import resolve_device, resolve_dtype, torch_dtype, vllm_dtype
from trainers.runtime.models import check_model_dir

DEFAULT_TEMPERATURE = 1.0
"""Evaluation samples at the rollout temperature (see the module docstring); 0 means greedy."""
BACKENDS = ("hf", "vllm")
VLLM_CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of an evaluation vLLM engine on CPU (a fraction of host memory fails at start-up)."""


def resolve_model_dir(path: str | Path, what: str = "model") -> Path:
    """The model directory for ``path``: ``path/model`` for a stage output directory, else ``path``.

    :func:`trainers.runtime.models.check_model_dir` with a stage output accepted and ``tokenizer.json``
    required; a :class:`~trainers.errors.ConfigError` (one line naming ``what``) when anything is missing.
    """
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


def resolve_stop_ids(tok, stop_ids: Sequence[int] | None = None) -> list[int]:
    """``stop_ids`` as a sorted list of distinct ids; None or empty: ``[tok.eos_token_id]``."""
    return sorted(set(stop_ids)) if stop_ids else [tok.eos_token_id]


def decode_responses(
    tok, token_lists: Sequence[Sequence[int]], stop_ids: Sequence[int] | None = None
) -> list[str]:
    """Response texts: each token list cut before its first stop id (:func:`resolve_stop_ids`), special
    tokens dropped, stripped."""
    stops = set(resolve_stop_ids(tok, stop_ids))
    texts = []
    for ids in token_lists:
        ids = list(ids)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        texts.append(tok.decode(ids[:end], skip_special_tokens=True).strip())
    return texts


def _generation_config(tok, max_new_tokens: int, temperature: float, stop_ids: Sequence[int] | None = None):
    """Plain ancestral sampling at ``temperature`` (no top-k/top-p: the policy's own distribution), or greedy;
    generation ends at any of the stop ids (:func:`resolve_stop_ids`)."""
    from transformers import GenerationConfig

    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    # transformers fills fields left unset from the model's generation_config.json: a real model's
    # repetition penalty (Qwen2.5 ships 1.05) would silently change the distribution evaluated.
    return GenerationConfig(
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=resolve_stop_ids(tok, stop_ids),
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
    stop_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids per prompt from transformers ``generate`` on LEFT-padded batches with masks.

    Batch ``k`` is sampled after ``torch.manual_seed(seed + k)``, so outputs depend only on the seed,
    the prompts and the batch size. Rows that stopped early (at any of ``stop_ids``) are padded after
    their stop id.
    """
    config = _generation_config(tok, max_new_tokens, temperature, stop_ids)
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
    stop_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids per prompt from an in-process vLLM engine (the rollout actor's class, no Ray).

    Uses :class:`actors.rollout.RolloutEngine` so evaluation starts vLLM exactly as PPO's rollouts do
    (on CPU: in-process ``uni`` executor, a KV cache given in bytes). Request seeds follow
    :func:`actors.rollout.request_seeds`, so outputs do not depend on batching. ``stop_ids`` (None: the
    engine reads the model directory's eos ids) end every response. A script that uses this backend on
    GPU needs an ``if __name__ == "__main__":`` guard (vLLM spawns processes there).
    """
    import gc

    from actors.rollout import RolloutEngine

    kwargs: dict = {"kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES} if device == "cpu" else {}
    if stop_ids:
        kwargs["eos_token_ids"] = sorted(set(stop_ids))
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


def chat_format_of(model_dir: Path, tok) -> ChatFormat:
    """The chat format of a model directory's tokenizer, with the directory's stop ids."""
    return open_chat_format(tok, model_dir, model_dir)


def generate(
    model_dir: str | Path,
    prompts: Sequence[str | Sequence[dict]],
    *,
    max_new_tokens: int,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    batch_size: int = 32,
    backend: str = "hf",
    device: str | None = None,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """One response per prompt from the causal LM in ``model_dir`` (decoded, cut before its first stop
    id, stripped).

    ``temperature`` 0 is greedy decoding; > 0 samples from the full distribution at that temperature
    (the default 1.0: see the module docstring). ``backend`` ``hf`` (transformers, left padding) or
    ``vllm`` (in-process engine; starting it costs ~20 s on CPU). ``stop_ids``: the stop set (the module
    docstring); None: the model's own stop set.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown generation backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    path = resolve_model_dir(model_dir)
    device = device or resolve_device()
    if backend == "vllm":
        tok = load_tokenizer(path)
        fmt = chat_format_of(path, tok)
        prompt_ids = [fmt.prompt_ids(as_messages(p)) for p in prompts]
        _check_prompt_lengths(prompt_ids, _positions_of(path) - max_new_tokens)
        stops = list(stop_ids or fmt.stop_ids)
        ids = generate_ids_vllm(
            path,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            device=device,
            stop_ids=stops,
        )
        return decode_responses(tok, ids, stops)
    model, tok = load_causal_lm(path, device)
    fmt = chat_format_of(path, tok)
    prompt_ids = [fmt.prompt_ids(as_messages(p)) for p in prompts]
    _check_prompt_lengths(prompt_ids, _max_prompt_len(model, max_new_tokens))
    stops = list(stop_ids or fmt.stop_ids)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    ids = generate_ids_hf(model, tok, prompt_ids, batch_size=batch_size, stop_ids=stops, **sampling)
    return decode_responses(tok, ids, stops)


def read_prompts(path: str | Path, n: int | None = None) -> list[str | list[dict]]:
    """The prompts of a validated prompts file or save_to_disk directory (any prompts format): a string for a
    one-user-turn prompt, else its messages (:func:`trainers.data.chat.prompt_of`); the first ``n`` if given."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"prompts file '{p}' does not exist")
    prompts = [prompt_of(r) for r in read_conversations("prompts", [p])]
    if not prompts:
        raise DataError(f"{p}: no prompts")
    return prompts[:n] if n else prompts
