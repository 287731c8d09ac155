"""Model directories shaped like real chat models, built locally for the tests, and TRL-style data.

Nothing is downloaded: each builder trains a byte-level BPE on the texts it is given (the synthetic world's,
:func:`world_texts`), wraps it with the family's special tokens and our own chat template, and saves a
randomly initialised ``tiny``-shaped model (:func:`trainers.runtime.presets.build_config`, head_dim 64 for
vLLM's CPU attention) of the family's architecture. A directory loads with ``AutoTokenizer``,
``AutoConfig``, ``AutoModelForCausalLM`` and ``GenerationConfig`` (local files only) and with vLLM's CPU
build, and takes a second or two to build::

    from tests.chat_models import FAMILIES, world_texts
    model_dir = FAMILIES["qwen2.5"].build(tmp_path / "qwen", world_texts())

What is real-model-like, i.e. what the world's own tokenizer (``trainers.data.tokenizer``) never shows:

- **Both families.** Special tokens come *after* the learned vocabulary (id 0 is the byte ``!``, not PAD);
  ``config.vocab_size`` is ``len(tokenizer)`` rounded up to a multiple of :data:`VOCAB_MULTIPLE`, so the
  embedding has rows no token uses (Qwen pads its vocabulary the same way); the text is split into
  pre-tokens before the byte-level BPE as Llama-3's and Qwen2's tokenizers do (:data:`LLAMA3_SPLIT_PATTERN`,
  :data:`QWEN_SPLIT_PATTERN`: punctuation takes the newlines after it, ``\\n\\n`` is one pre-token);
  ``generation_config.json`` carries the release's sampling defaults (``do_sample``, ``temperature``,
  ``top_p``...), which transformers' ``generate`` applies unless the caller sets its own.
- **Qwen2.5-Instruct-like** (``Qwen2ForCausalLM``: biases on q/k/v, tied embeddings as the 0.5B model):
  no BOS token at all (``bos_token`` None, nothing added on encode), yet ``config.json`` names
  ``<|endoftext|>`` as ``bos_token_id`` as Qwen's configs do; PAD ``<|endoftext|>``, EOS ``<|im_end|>``;
  a ChatML template that adds a default system turn ("You are a helpful assistant.") when the
  conversation has none, stored in ``tokenizer_config.json`` (as Qwen2.5 ships it); ``config.json`` stops
  on ``<|im_end|>`` alone, ``generation_config.json`` on ``[<|im_end|>, <|endoftext|>]``; loads as
  transformers' ``Qwen2Tokenizer`` (``tokenizer_class``), whose ``unk_token`` is ``<|endoftext|>``.
- **Llama-3-Instruct-like** (``LlamaForCausalLM``, untied embeddings as the 8B model): BOS
  ``<|begin_of_text|>`` added by the tokenizer's post-processor on every ``tok(text)`` *and* written by the
  template (encoding a rendered conversation with special tokens gives two BOS); no PAD token, but unused
  reserved specials (``<|reserved_special_token_0|>``..., ``<|finetune_right_pad_id|>``); EOS
  ``<|eot_id|>`` in the tokenizer; the template trims each message's content and is stored in
  ``chat_template.jinja`` (transformers 5's layout, the other place a template is found); three stop ids
  ``[<|end_of_text|>, <|eom_id|>, <|eot_id|>]`` in ``config.json`` and ``generation_config.json``
  (Llama-3.1's layout).

:func:`write_trl_data` writes the world's data sets as the JSONL files a TRL user brings
(``messages``; ``prompt``/``chosen``/``rejected`` message lists; ``prompt``; ``text``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from trainers.data.tokenizer import bos_post_processor, train_bpe

TEXT_VOCAB_SIZE = 1024
"""Entries of the learned byte-level BPE (bytes + merges), before the family's special tokens."""
VOCAB_MULTIPLE = 64
"""``config.vocab_size`` is ``len(tokenizer)`` rounded up to this (the model has unused embedding rows)."""
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions stay one pre-token
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"  # a word, with at most one leading space or symbol
    r"|\p{N}{1,3}"  # digits, at most three to a pre-token
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # a run of punctuation and the newlines after it
    r"|\s*[\r\n]+"  # newlines (and the spaces before them): "\n\n" is one pre-token
    r"|\s+(?!\S)"  # spaces, leaving the last one to the word that follows
    r"|\s+"
)
"""The GPT-4-style split Llama-3's tokenizer applies before its byte-level BPE."""
QWEN_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
"""Qwen2's split: the same, but every digit its own pre-token. transformers' ``Qwen2Tokenizer`` (which
``AutoTokenizer`` picks for a ``qwen2`` model) replaces tokenizer.json's pre-tokenizer with this one and an NFC
normaliser, so the saved tokenizer.json has them too: the ``tokenizers`` library and transformers agree."""

DEFAULT_SYSTEM = "You are a helpful assistant."
"""The system turn the Qwen-like template adds to a conversation that has none."""

CHATML_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set system = '" + DEFAULT_SYSTEM + "' %}{% set turns = messages %}"
    "{% endif %}"
    "<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% for message in turns %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML with a default system turn: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama-3's header format: BOS, then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""The Qwen-like tokenizer's special tokens, in id order after the learned vocabulary."""
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_3|>",
)
"""The Llama-3-like tokenizer's special tokens, in Llama-3.1's id order after the learned vocabulary."""


@dataclass(frozen=True)
class ChatFamily:
    """One model family the tests build: its builder and the token facts a test checks against."""

    name: str
    architecture: str
    """``config.model_type``: ``qwen2`` or ``llama``."""
    build: Callable[..., Path]
    """``build(out_dir, texts, seed=0) -> out_dir``."""
    bos: str | None
    """The tokenizer's BOS token (None: the family has none)."""
    eos: str
    """The tokenizer's EOS token (``tokenizer_config.json``)."""
    pad: str | None
    """The tokenizer's PAD token (None: the family has none)."""
    end_of_turn: str
    """The token the chat template closes every turn with."""
    stop_tokens: tuple[str, ...]
    """``generation_config.json``'s ``eos_token_id``, as tokens, in its order."""
    default_system: str | None
    """The system turn the template adds when a conversation has none (None: it adds none)."""


def world_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` texts of the synthetic world (pretraining documents, prompts, demonstrations), in a fixed
    order for ``seed``: enough to train a tokenizer without synthesising a whole world."""
    from trainers.data.responses import demonstration
    from trainers.data.world_text import pretrain_document, sample_prompt, sample_task

    rng = random.Random(f"{seed}:chat-model-texts")
    texts: list[str] = []
    while len(texts) < n:
        prompt = sample_prompt(sample_task(rng), rng)
        texts += [pretrain_document(rng), prompt, demonstration(prompt, rng)]
    return texts[:n]


def _tokenizer(
    texts: Sequence[str], specials: Sequence[str], split_pattern: str, bos: str | None = None, nfc=False
):
    """The BPE on ``texts`` split by ``split_pattern``, with ``specials`` appended after the learned vocabulary
    (ids ``>= len(vocab)``); ``bos`` (if any) put before every encoded text by the post-processor; ``nfc``
    adds an NFC normaliser (after training: the identity on the world's ASCII text)."""
    from tokenizers import AddedToken, normalizers

    tok = train_bpe(texts, TEXT_VOCAB_SIZE, (), split_pattern=split_pattern)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos is not None:
        tok.post_processor = bos_post_processor(tok, bos)
    return tok


def _padded_vocab(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`VOCAB_MULTIPLE`, and at least one row more than ``n``."""
    return (n // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE


def _save_model(
    out: Path,
    tok,
    architecture: str,
    seed: int,
    generation: dict,
    preset: str = "tiny",
    vocab_size: int | None = None,
    **config_fields,
) -> None:
    """Save a random ``preset``-shaped ``architecture`` model (config + model.safetensors) for the saved
    tokenizer ``tok`` and ``generation_config.json`` into ``out``; ``config_fields`` override the config's
    token ids and tying. ``vocab_size`` None: ``len(tok)`` padded (:func:`_padded_vocab`). The weights are
    float32, or bfloat16 for a GPU preset (``trainers.runtime.presets``)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trainers.runtime.presets import build_config, get_preset

    vocab = vocab_size or _padded_vocab(len(tok))
    config = build_config(preset, tok, architecture=architecture, vocab_size=vocab, **config_fields)
    torch.manual_seed(seed)
    dtype = getattr(torch, get_preset(preset).dtype)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(str(out))
    # Written whole: save_pretrained's own generation_config.json would only copy config.json's ids.
    GenerationConfig(**generation).save_pretrained(str(out))


def _set_tokenizer_class(out: Path, name: str) -> None:
    """Name the transformers tokenizer class in ``out/tokenizer_config.json`` (as a release does)."""
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"tokenizer_class": name}, indent=2) + "\n")


def build_qwen_like(
    out_dir: str | Path,
    texts: Sequence[str],
    seed: int = 0,
    preset: str = "tiny",
    vocab_size: int | None = None,
) -> Path:
    """A Qwen2.5-Instruct-like model directory in ``out_dir`` (see the module docstring); returns it.

    Same ``texts`` and ``seed`` -> the same tokenizer and weights. ``preset``/``vocab_size``: another shape,
    e.g. ``qwen2.5-0.5b`` with Qwen's 151,936 rows for the GPU tests (bfloat16, rows past the tokenizer's
    unused).
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(texts, QWEN_SPECIALS, QWEN_SPLIT_PATTERN, nfc=True),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(str(out), save_jinja_files=False)  # the template inside tokenizer_config.json
    _set_tokenizer_class(out, "Qwen2Tokenizer")
    end_of_text, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    generation = {
        "bos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "eos_token_id": [im_end, end_of_text],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    _save_model(
        out,
        tok,
        "qwen2",
        seed,
        generation,
        preset=preset,
        vocab_size=vocab_size,
        bos_token_id=end_of_text,
        eos_token_id=im_end,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    return out


def build_llama3_like(out_dir: str | Path, texts: Sequence[str], seed: int = 0) -> Path:
    """A Llama-3-Instruct-like model directory in ``out_dir`` (see the module docstring); returns it.

    Same ``texts`` and ``seed`` -> the same tokenizer and weights.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(texts, LLAMA3_SPECIALS, LLAMA3_SPLIT_PATTERN, bos="<|begin_of_text|>"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=True,
    )
    tok.save_pretrained(str(out))  # the template in chat_template.jinja
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    stops = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    generation = {
        "bos_token_id": bos,
        "eos_token_id": stops,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    _save_model(
        out,
        tok,
        "llama",
        seed,
        generation,
        bos_token_id=bos,
        eos_token_id=stops,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    return out


FAMILIES: dict[str, ChatFamily] = {
    "qwen2.5": ChatFamily(
        name="qwen2.5",
        architecture="qwen2",
        build=build_qwen_like,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        default_system=DEFAULT_SYSTEM,
    ),
    "llama3": ChatFamily(
        name="llama3",
        architecture="llama",
        build=build_llama3_like,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        end_of_turn="<|eot_id|>",
        stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        default_system=None,
    ),
}
"""The chat-model families by name (parametrise a test over ``FAMILIES.values()``)."""


# --------------------------------------------------------------------------------------------------
# TRL-style data from the synthetic world
# --------------------------------------------------------------------------------------------------

TRL_KINDS = ("demonstrations", "comparisons", "prompts", "pretrain")
"""The data kinds :func:`write_trl_data` writes."""


def _turns(prompt: str, system: str | None) -> list[dict]:
    """The prompt as a message list: an optional system turn, then the user's."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": prompt}]


def best_and_worst(responses: Sequence[str], ranking: Sequence[int]) -> tuple[str, str]:
    """(chosen, rejected) of a K-way ranking (0 = best): the first best and the first worst response."""
    best = min(range(len(ranking)), key=lambda i: ranking[i])
    worst = max(range(len(ranking)), key=lambda i: ranking[i])
    return responses[best], responses[worst]


def trl_record(kind: str, row: dict, prompt_style: str = "messages", system: str | None = None) -> dict:
    """One world row of ``kind`` as a TRL-style record.

    demonstrations -> ``{"messages": [user, assistant]}``; comparisons -> ``{"prompt": [user],
    "chosen": [assistant], "rejected": [assistant]}`` (best vs worst of the ranking); prompts ->
    ``{"messages": [user]}`` or ``{"prompt": str}`` (``prompt_style``) plus the row's other columns;
    pretrain -> ``{"text"}``. ``system`` adds a system turn before the user's (not to ``prompt: str``).
    """
    if kind == "demonstrations":
        return {
            "messages": [*_turns(row["prompt"], system), {"role": "assistant", "content": row["response"]}]
        }
    if kind == "comparisons":
        chosen, rejected = best_and_worst(row["responses"], row["ranking"])
        return {
            "prompt": _turns(row["prompt"], system),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    if kind == "prompts":
        extra = {k: v for k, v in row.items() if k != "prompt"}
        if prompt_style == "messages":
            return {"messages": _turns(row["prompt"], system), **extra}
        if prompt_style == "prompt":
            return {"prompt": row["prompt"], **extra}
        raise ValueError(f"prompt_style must be 'messages' or 'prompt', got {prompt_style!r}")
    if kind == "pretrain":
        return {"text": row["text"]}
    raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(TRL_KINDS)}")


def write_trl_data(
    world_dir: str | Path,
    out_dir: str | Path,
    *,
    prompt_style: str = "messages",
    system: str | None = None,
    kinds: Sequence[str] = TRL_KINDS,
) -> Path:
    """Write the world in ``world_dir`` (``trainers.data.world.synthesize``) as TRL-style JSONL files
    ``out_dir/<kind>/<split>.jsonl`` (one :func:`trl_record` per world row, in the world's order); returns
    ``out_dir``. ``prompt_style`` and ``system`` as in :func:`trl_record`."""
    world, out = Path(world_dir), Path(out_dir)
    for kind in kinds:
        for path in sorted((world / kind).glob("*.parquet")):
            rows = pq.read_table(path).to_pylist()
            target = out / kind / f"{path.stem}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                json.dumps(trl_record(kind, row, prompt_style, system), ensure_ascii=False) for row in rows
            ]
            target.write_text("".join(line + "\n" for line in lines))
    return out
