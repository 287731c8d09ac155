"""The world's tokenizer: a byte-level BPE trained offline, saved in Hugging Face format.

Nothing is downloaded: ``train_tokenizer`` learns merges from the synthetic world's text with the
``tokenizers`` library (about a second) and saves a ``PreTrainedTokenizerFast`` that both
transformers (``AutoTokenizer.from_pretrained``) and vLLM load as is.

Special tokens (ids fixed by their order): ``<pad>`` = 0, ``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS),
``<|user|>`` = 3, ``<|assistant|>`` = 4. PAD is distinct from EOS so masks built from ids never
hide a real EOS (docs/ppo_details.md item 2). Like Llama's, the tokenizer adds BOS when called with
``add_special_tokens=True``; :mod:`trainers.data.collate` adds BOS/EOS itself and always encodes
with ``add_special_tokens=False``.

Chat format (the saved Jinja chat template renders exactly this)::

    <s><|user|>\\n{prompt}\\n<|assistant|>\\n{response}</s>

so ``apply_chat_template([user], add_generation_prompt=True, tokenize=False)`` equals
``"<s>" + format_prompt(prompt)``, and a conversation with the assistant's answer equals
``"<s>" + format_prompt(prompt) + response + "</s>"``. The byte-level pre-tokenizer splits at the
newline before the response, so encoding prompt and response separately gives the same ids as
encoding them together.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.errors import ConfigError, DataError

if TYPE_CHECKING:  # transformers and tokenizers are imported where used: format_prompt stays cheap
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
USER_TAG, ASSISTANT_TAG = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, USER_TAG, ASSISTANT_TAG)
"""In id order: PAD = 0, BOS = 1, EOS = 2, then the chat role markers."""
DEFAULT_VOCAB_SIZE = 1024
MIN_VOCAB_SIZE = 300
"""256 byte symbols + the special tokens + a few merges."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] }}{{ eos_token }}"
    "{% else %}"
    "{{ raise_exception('only user and assistant roles are supported') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Jinja chat template saved with the tokenizer; renders :func:`format_prompt` after BOS."""


def format_prompt(prompt: str) -> str:
    """The chat wrapping of a user prompt, ending where the assistant's response begins."""
    return f"{USER_TAG}\n{prompt}\n{ASSISTANT_TAG}\n"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Iterable[str] = (),
    split_pattern: str | None = None,
) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` entries on ``texts`` (deterministic), no post-processor.

    ``special_tokens`` take the first ids, in order. ``split_pattern``: a regex that splits text into
    pre-tokens before the byte-level mapping (as Llama-3's and Qwen2's tokenizers do); None keeps the
    byte-level pre-tokenizer's own GPT-2 split.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bos_post_processor(tok: Tokenizer, bos: str):
    """A post-processor that puts ``bos`` before every encoded text (``tok(text)``), like Llama's."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )


def _bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train the world's byte-level BPE with the special tokens first (so their ids are 0..4)."""
    tok = train_bpe(texts, vocab_size, SPECIAL_TOKENS)
    # BOS on `tok(text)` like Llama's tokenizer (vLLM encodes text prompts this way).
    tok.post_processor = bos_post_processor(tok, BOS)
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a trained ``tokenizers.Tokenizer`` (specials, chat template)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER_TAG, ASSISTANT_TAG],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: list[str], out_dir: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train the world's BPE on ``texts`` (deterministic: same texts, same ``tokenizer.json``).

    Saves with ``save_pretrained`` into ``out_dir`` when given.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"tokenizer vocab_size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE}")
    fast = wrap(_bpe(texts, vocab_size))
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path, chat_template: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer directory (:func:`train_tokenizer`'s or a real model's) and settle its PAD.

    ``chat_template``: a Jinja file that replaces the tokenizer's own template (``model.chat_template``);
    it is saved with every model trained from here. A tokenizer without PAD gets one from
    :func:`choose_pad_token` (the same choice on the driver and in every worker, so all agree).
    """
    from transformers import PreTrainedTokenizerFast

    if not (Path(path) / "tokenizer.json").is_file():
        raise DataError(
            f"{path}: no tokenizer.json (expected a tokenizer directory written by save_pretrained)"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if chat_template is not None:
        template = Path(chat_template)
        if not template.is_file():
            raise ConfigError(f"model.chat_template='{template}': file not found")
        tok.chat_template = template.read_text(encoding="utf-8")
    if tok.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no EOS token (eos_token in tokenizer_config.json)")
    if tok.pad_token_id is None:
        tok.pad_token = choose_pad_token(tok)
    return tok


def choose_pad_token(tok) -> str:
    """A PAD for a tokenizer that has none: an added special token the chat template and the stop set do
    not use (one named like ``pad``, else a ``reserved`` one, as Llama-3 ships), else EOS itself.

    PAD may equal EOS because no mask is built by comparing ids with PAD (docs/ppo_details.md item 2); an
    unused token is still preferred, so a plain ``AutoModelForSequenceClassification`` (which finds the last
    token as the last non-PAD one) reads a saved reward model's score at the right place.
    """
    used = {tok.bos_token, tok.eos_token}
    if tok.chat_template:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            rendered = tok.apply_chat_template(probe, tokenize=False)
        except Exception:  # the template's problems are reported by ChatFormat, with context
            rendered = ""
        used |= {t for t in tok.added_tokens_encoder if t in rendered}
    free = sorted(
        (added.content for added in tok.added_tokens_decoder.values() if added.special),
        key=tok.convert_tokens_to_ids,
    )
    free = [t for t in free if t not in used]
    for word in ("pad", "reserved"):
        named = [t for t in free if word in t.lower()]
        if named:
            return named[0]
    return tok.eos_token
