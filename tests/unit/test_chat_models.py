"""The locally built chat-model directories (tests/chat_models.py) and the TRL-style data written from the world.

The directories must load with transformers' Auto classes from local files only and carry each family's
token facts (BOS, PAD, EOS, stop ids, template) that the pipeline has to cope with.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.chat_models import (
    DEFAULT_SYSTEM,
    FAMILIES,
    LLAMA3_SPECIALS,
    QWEN_SPECIALS,
    VOCAB_MULTIPLE,
    best_and_worst,
    build_llama3_like,
    build_qwen_like,
    world_texts,
    write_trl_data,
)

CONVERSATION = [
    {"role": "user", "content": "What does Bella eat?"},
    {"role": "assistant", "content": "  Bella eats apples.\n"},
]


@pytest.fixture(scope="module")
def texts():
    return world_texts(2000)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("chat_models")
    return {name: family.build(root / name, texts) for name, family in FAMILIES.items()}


def _load(model_dir):
    """(tokenizer, config, generation config) from local files only."""
    return (
        AutoTokenizer.from_pretrained(model_dir, local_files_only=True),
        AutoConfig.from_pretrained(model_dir, local_files_only=True),
        GenerationConfig.from_pretrained(model_dir, local_files_only=True),
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_directory_loads_with_auto_classes_and_runs_a_forward_pass(model_dirs, name):
    tok, config, _ = _load(model_dirs[name])
    model = AutoModelForCausalLM.from_pretrained(model_dirs[name], local_files_only=True)
    expected = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[FAMILIES[name].architecture]
    assert type(model).__name__ == expected and config.model_type == FAMILIES[name].architecture
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs it
    # Padded like Qwen's: rows no token uses, so vocab_size != len(tokenizer).
    assert config.vocab_size % VOCAB_MULTIPLE == 0 and config.vocab_size > len(tok)
    ids = tok.apply_chat_template(CONVERSATION, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)  # (B, T, V)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tokens_match_the_family_record(model_dirs, name):
    family = FAMILIES[name]
    tok, config, generation = _load(model_dirs[name])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (family.bos, family.eos, family.pad)
    assert generation.eos_token_id == tok.convert_tokens_to_ids(list(family.stop_tokens))
    assert tok.convert_tokens_to_ids(family.end_of_turn) in generation.eos_token_id
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered.endswith("Bella eats apples." + family.end_of_turn) or rendered.endswith(
        "Bella eats apples.\n" + family.end_of_turn + "\n"
    )
    # Special tokens come after the learned vocabulary, as in real releases: id 0 is an ordinary byte.
    specials = {"qwen2.5": QWEN_SPECIALS, "llama3": LLAMA3_SPECIALS}[name]
    special_ids = tok.convert_tokens_to_ids(list(specials))
    assert special_ids == list(range(len(tok) - len(specials), len(tok)))
    assert tok.convert_ids_to_tokens(0) == "!"
    assert config.pad_token_id is None


def test_qwen_like_has_no_bos_and_two_stop_ids(model_dirs):
    tok, config, generation = _load(model_dirs["qwen2.5"])
    end_of_text, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert tok.bos_token is None and tok.bos_token_id is None
    text = "Bella eats apples."
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (tok.pad_token_id, tok.eos_token_id) == (end_of_text, im_end)
    assert generation.eos_token_id == [im_end, end_of_text] and generation.pad_token_id == end_of_text
    # config.json stops on one id and names a BOS the tokenizer never adds (Qwen2.5-Instruct's layout).
    assert config.eos_token_id == im_end and config.bos_token_id == end_of_text
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert "chat_template" in json.loads((model_dirs["qwen2.5"] / "tokenizer_config.json").read_text())


def test_qwen_like_template_adds_a_default_system_turn(model_dirs):
    tok, _, _ = _load(model_dirs["qwen2.5"])
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat does Bella eat?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    whole = tok.apply_chat_template(own_system, tokenize=False)
    assert whole.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert DEFAULT_SYSTEM not in whole and whole.count("<|im_start|>system") == 1
    assert whole.endswith("<|im_start|>assistant\n  Bella eats apples.\n<|im_end|>\n")  # content not trimmed
    ids = tok.apply_chat_template(own_system, return_dict=True)["input_ids"]
    assert ids == tok(whole)["input_ids"]  # no BOS either way


def test_llama3_like_adds_bos_has_no_pad_and_three_stop_ids(model_dirs):
    tok, config, generation = _load(model_dirs["llama3"])
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    stops = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    text_ids = tok("Bella eats apples.", add_special_tokens=False)["input_ids"]
    assert tok("Bella eats apples.")["input_ids"] == [bos, *text_ids]
    assert generation.eos_token_id == stops and config.eos_token_id == stops
    assert config.bos_token_id == bos and generation.pad_token_id is None
    assert not config.tie_word_embeddings
    # Unused reserved specials exist (a pad candidate) and are special: never split, skipped on decode.
    reserved = tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert tok.decode([*text_ids, reserved], skip_special_tokens=True) == "Bella eats apples."


def test_llama3_like_template_puts_bos_once_and_trims_content(model_dirs):
    tok, _, _ = _load(model_dirs["llama3"])
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    whole = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert whole == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat does Bella eat?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBella eats apples.<|eot_id|>"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    assert ids.count(bos) == 1 and ids[0] == bos
    # The trap a pipeline must avoid: encoding the rendered text with special tokens doubles BOS.
    assert tok(whole)["input_ids"][:2] == [bos, bos]


def test_build_is_deterministic_and_the_seed_sets_the_weights(tmp_path, texts, model_dirs):
    again = build_qwen_like(tmp_path / "again", texts, seed=0)
    other = build_llama3_like(tmp_path / "other", texts, seed=1)
    first = model_dirs["qwen2.5"]
    assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dirs["llama3"] / "tokenizer.json").read_bytes()
    weights = (other / "model.safetensors").read_bytes()
    assert weights != (model_dirs["llama3"] / "model.safetensors").read_bytes()


def test_best_and_worst_of_a_ranking_with_ties():
    assert best_and_worst(["a", "b", "c", "d"], [2, 0, 3, 0]) == ("b", "c")
    assert best_and_worst(["a", "b", "c"], [1, 1, 0]) == ("c", "a")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from trainers.data.world import synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, seed=0, scale=0.02)
    return out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _parquet(world, kind, split):
    return pq.read_table(world / kind / f"{split}.parquet").to_pylist()


def test_trl_data_holds_the_worlds_rows(world, tmp_path):
    out = write_trl_data(world, tmp_path / "trl")
    for split in ("train", "valid", "test"):
        demos = _jsonl(out / "demonstrations" / f"{split}.jsonl")
        assert demos == [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                ]
            }
            for r in _parquet(world, "demonstrations", split)
        ]
        comparisons = _jsonl(out / "comparisons" / f"{split}.jsonl")
        rows = _parquet(world, "comparisons", split)
        assert len(comparisons) == len(rows) > 0
        for record, row in zip(comparisons, rows):
            assert record["prompt"] == [{"role": "user", "content": row["prompt"]}]
            chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
            assert record["chosen"][0]["role"] == record["rejected"][0]["role"] == "assistant"
            rank = dict(zip(row["responses"], row["ranking"]))
            assert rank[chosen] == min(row["ranking"]) and rank[rejected] == max(row["ranking"])
        prompts = _jsonl(out / "prompts" / f"{split}.jsonl")
        prompt_rows = _parquet(world, "prompts", split)
        assert [p["messages"] for p in prompts] == [
            [{"role": "user", "content": r["prompt"]}] for r in prompt_rows
        ]
        assert [{k: v for k, v in p.items() if k != "messages"} for p in prompts] == [
            {k: v for k, v in r.items() if k != "prompt"} for r in prompt_rows
        ]  # extra columns (task, options, answer...) passed along
        assert _jsonl(out / "pretrain" / f"{split}.jsonl") == _parquet(world, "pretrain", split)


def test_trl_data_prompt_strings_and_a_system_turn(world, tmp_path):
    out = write_trl_data(
        world,
        tmp_path / "trl",
        prompt_style="prompt",
        system="Be brief.",
        kinds=("prompts", "demonstrations"),
    )
    assert sorted(p.name for p in out.iterdir()) == ["demonstrations", "prompts"]
    rows = _parquet(world, "prompts", "train")
    assert [p["prompt"] for p in _jsonl(out / "prompts" / "train.jsonl")] == [r["prompt"] for r in rows]
    first = _jsonl(out / "demonstrations" / "train.jsonl")[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[0]["content"] == "Be brief."
