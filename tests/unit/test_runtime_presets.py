"""Model presets: shapes, parameter counts, token ids, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

from trainers.errors import ConfigError
from trainers.runtime import presets


class _Tok:
    """The three ids and the length are all build_config reads from a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 7, 8, 9

    def __len__(self):
        return 777


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_is_a_small_llama_with_head_dim_64():
    config = presets.build_config("tiny", 1024)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, LlamaForCausalLM)
    assert config.head_dim == 64 and config.hidden_size // config.num_attention_heads == 64
    assert _numel(model) == presets.count_params(config) < 2_000_000
    assert next(model.parameters()).dtype == torch.float32
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    loss = model(input_ids=torch.tensor([[1, 5, 6, 2]]), labels=torch.tensor([[1, 5, 6, 2]])).loss
    assert torch.isfinite(loss)


def test_small_param_count_matches_the_built_model():
    config = presets.build_config("small", 1024)
    assert config.head_dim == 64
    assert _numel(AutoModelForCausalLM.from_config(config)) == presets.count_params(config)


def test_vocabulary_and_special_ids_come_from_the_tokenizer():
    config = presets.build_config("tiny", _Tok())
    assert config.vocab_size == 777
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (7, 8, 9)


def test_architecture_builds_the_presets_shape_as_another_model():
    config = presets.build_config("tiny", 1024, architecture="qwen2")
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, Qwen2ForCausalLM)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (128, 2, 384)
    assert config.hidden_size // config.num_attention_heads == 64
    assert _numel(model) == presets.count_params(config)  # the q/k/v biases counted
    with pytest.raises(ConfigError, match="unknown architecture 'gpt2'"):
        presets.build_config("tiny", architecture="gpt2")


def test_qwen_shapes_have_the_published_sizes():
    # Qwen2.5-0.5B: 0.49B parameters, Qwen2.5-1.5B: 1.54B (tied embeddings, vocab 151,936).
    assert presets.describe("qwen2.5-0.5b")["params"] == 494_032_768
    assert presets.describe("qwen2.5-1.5b")["params"] == 1_543_714_304
    assert presets.describe("qwen2.5-0.5b")["kv_heads"] == 2


def test_qwen_param_formula_matches_a_built_one_layer_model():
    config = presets.build_config("qwen2.5-0.5b", 512, num_hidden_layers=1, dtype="float32")
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, Qwen2ForCausalLM)
    assert _numel(model) == presets.count_params(config)


def test_overrides_apply_and_errors_name_what_is_wrong():
    assert presets.build_config("tiny", 1024, num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ConfigError, match="tiny, small, qwen2.5-0.5b, qwen2.5-1.5b"):
        presets.build_config("huge", 1024)
    with pytest.raises(ConfigError, match="no_such_field"):
        presets.build_config("tiny", 1024, no_such_field=1)
    with pytest.raises(ConfigError, match="divide"):
        presets.build_config("tiny", 1024, num_attention_heads=3)
