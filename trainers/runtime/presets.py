"""Model presets: randomly initialised decoder configs, from the CPU demo model to benchmark shapes.

Nothing is downloaded: a preset is a ``transformers`` config that the stages build with
``AutoModelForCausalLM.from_config`` (random init) and pretrain or benchmark.

=================  ============  ======  ======  =====  =====  ======  ========  ======================
preset             architecture  hidden  layers  heads  kv     ffn     max pos   use
=================  ============  ======  ======  =====  =====  ======  ========  ======================
``tiny``           Llama         128     2       2      2      384     512       CPU demo and tests
``small``          Llama         256     4       4      4      768     1024      CPU, a little better
``qwen2.5-0.5b``   Qwen2         896     24      14     2      4864    32768     GPU benchmark shape
``qwen2.5-1.5b``   Qwen2         1536    28      12     2      8960    32768     GPU benchmark shape
=================  ============  ======  ======  =====  =====  ======  ========  ======================

The CPU presets keep ``head_dim = 64`` because vLLM's CPU attention rejects small heads (16 failed, 64 works;
docs/design.md, "The synthetic world"). Every preset ties the input and output embeddings (as Qwen2.5's small
models do); for the tiny model that is a quarter of its parameters saved. The vocabulary, PAD, BOS and EOS
come from the tokenizer passed to :func:`build_config`; the Qwen shapes default to Qwen's 151,936 entries when
only a shape is wanted. CPU presets are float32; GPU presets bfloat16.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from trainers.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """The shape of one model preset."""

    architecture: str
    """``llama`` or ``qwen2``."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    """Used only when no tokenizer / vocabulary size is given."""
    dtype: str
    """``float32`` (CPU presets) or ``bfloat16`` (GPU presets)."""
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    description: str = ""


_QWEN = {"architecture": "qwen2", "vocab_size": 151936, "dtype": "bfloat16", "rope_theta": 1e6}
PRESETS: dict[str, Preset] = {
    "tiny": Preset("llama", 128, 2, 2, 2, 384, 512, 1024, "float32", description="CPU demo and tests"),
    "small": Preset("llama", 256, 4, 4, 4, 768, 1024, 1024, "float32", description="CPU, a little better"),
    "qwen2.5-0.5b": Preset(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        description="GPU benchmark shape (Qwen2.5-0.5B)",
        **_QWEN,
    ),
    "qwen2.5-1.5b": Preset(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        max_position_embeddings=32768,
        description="GPU benchmark shape (Qwen2.5-1.5B)",
        **_QWEN,
    ),
}
"""Known presets by name."""

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ConfigError naming the valid ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _token_ids(tokenizer_or_vocab_size, preset: Preset) -> dict:
    """``vocab_size`` and PAD/BOS/EOS ids from a tokenizer, a vocabulary size, or the preset."""
    if tokenizer_or_vocab_size is None or isinstance(tokenizer_or_vocab_size, int):
        vocab = tokenizer_or_vocab_size or preset.vocab_size
        # The world's tokenizer convention (trainers.data.tokenizer): <pad>=0, <s>=1, </s>=2.
        return {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    tok = tokenizer_or_vocab_size
    return {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def build_config(
    preset: str, tokenizer_or_vocab_size=None, *, architecture: str | None = None, **overrides
) -> PretrainedConfig:
    """A randomly-initialisable config for ``preset``; ``overrides`` replace any config field.

    ``tokenizer_or_vocab_size``: a tokenizer (vocabulary and PAD/BOS/EOS ids taken from it), an
    int vocabulary size (ids 0/1/2, the world tokenizer's), or None for the preset's default.
    ``architecture`` (``llama`` or ``qwen2``) builds the preset's shape as another architecture
    (the tests' Qwen2-like tiny model); None keeps the preset's own.
    """
    p = get_preset(preset)
    architecture = architecture or p.architecture
    if architecture not in _CONFIG_CLASSES:
        raise ConfigError(f"unknown architecture {architecture!r}; valid: {', '.join(_CONFIG_CLASSES)}")
    cls = _CONFIG_CLASSES[architecture]
    kwargs = {
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.hidden_size // p.num_attention_heads,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "tie_word_embeddings": p.tie_word_embeddings,
        "rms_norm_eps": p.rms_norm_eps,
        "dtype": p.dtype,
        **_token_ids(tokenizer_or_vocab_size, p),
    }
    allowed = set(inspect.signature(cls.__init__).parameters) | set(kwargs)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"model preset {preset!r}: unknown config field(s) {', '.join(unknown)}")
    kwargs |= overrides
    if (
        kwargs["hidden_size"] % kwargs["num_attention_heads"]
        or kwargs["num_attention_heads"] % kwargs["num_key_value_heads"]
    ):
        raise ConfigError(f"model preset {preset!r}: hidden size, heads and KV heads do not divide evenly")
    if "head_dim" not in overrides:
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if architecture == "qwen2":
        kwargs.pop("head_dim")  # Qwen2Config derives it (hidden / heads) and takes no such argument
    return cls(**kwargs)


def count_params(config: PretrainedConfig) -> int:
    """Parameter count of the model a Llama/Qwen2 config builds, computed without building it."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    bias = config.model_type == "qwen2"  # Qwen2 has biases on q, k and v
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if bias else 0)
    per_layer = attention + 3 * h * inter + 2 * h  # + two RMSNorm weights
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + h  # + final norm


def describe(preset: str, tokenizer_or_vocab_size=None) -> dict:
    """Shape and parameter count of a preset (``params``, ``non_embedding_params``...)."""
    p = get_preset(preset)
    config = build_config(preset, tokenizer_or_vocab_size)
    total = count_params(config)
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return {
        "preset": preset,
        "architecture": p.architecture,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "params": total,
        "non_embedding_params": total - embeddings,
        "description": p.description,
    }
