"""The world's tokenizer (special ids, round trip, chat template) and the collate functions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import template_ids, world_corpus
from trainers.data.collate import (
    IGNORE_INDEX,
    collate_lm,
    collate_prompts,
    collate_rm,
    encode_text,
    position_ids_from_mask,
    text_windows,
)
from trainers.data.tokenizer import format_prompt, load_tokenizer, train_tokenizer
from trainers.errors import ConfigError, DataError
from trainers.runtime import presets


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


# --- tokenizer ---


def test_special_tokens_are_distinct_with_fixed_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [3, 4]
    assert len(tok) == 600


def test_round_trip_of_world_text(tok):
    for text in world_corpus(seed=9, n=20):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # markers are single tokens, not split into bytes
    assert tok.encode(format_prompt("Hi"), add_special_tokens=False)[0] == 3


def test_calling_the_tokenizer_adds_bos_like_llama(tok):
    assert tok("Tilo")["input_ids"][0] == tok.bos_token_id
    assert tok("Tilo", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_chat_template_matches_format_prompt_and_the_encoders(tok):
    prompt, response = "What does Tilo like to eat?\n\nOPTIONS:\n- fish\n- nuts", "Tilo likes to eat nuts."
    user = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == "<s>" + format_prompt(prompt)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    assert full == "<s>" + format_prompt(prompt) + response + "</s>"
    # encoding prompt and response separately gives exactly the ids of the whole conversation
    parts = [[tok.bos_token_id], tok.encode(format_prompt(prompt), add_special_tokens=False)]
    parts += [tok.encode(response, add_special_tokens=False), [tok.eos_token_id]]
    assert sum(parts, []) == tok.encode(full, add_special_tokens=False)
    assert encode_text(tok, "Tilo is a fox.")[0] == 1 and encode_text(tok, "Tilo is a fox.")[-1] == 2


def test_auto_tokenizer_loads_the_saved_directory(tok_dir, tok):
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "Mara lives in the lake."
    assert auto.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert auto.pad_token == "<pad>" and auto.eos_token == "</s>" and auto.chat_template


def test_training_is_deterministic(tmp_path, tok_dir):
    train_tokenizer(world_corpus(), tmp_path, vocab_size=600)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_tokenizer_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["a b c"], None, vocab_size=100)
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# --- collation ---


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_collate_lm_left_pads_and_masks_prompt_padding_and_first_token():
    batch = collate_lm([([5, 6, 7, 8], 2), ([9, 10], 0), ([11, 12, 13], 3)], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10], [0, 11, 12, 13]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]))
    x = IGNORE_INDEX
    # row 0: 2 prompt tokens masked; row 1 (pretraining, n_prompt=0): pad + first token masked;
    # row 2: all prompt, nothing to learn
    assert torch.equal(batch["labels"], torch.tensor([[x, x, 7, 8], [x, x, x, 10], [x, x, x, x]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]))


def test_collate_rm_layout():
    groups = [([1, 2], [[3], [4, 5]], [0, 1]), ([1], [[6], [7], [8]], [1, 0, 1])]
    batch = collate_rm(groups, pad_id=0)
    assert batch["input_ids"].shape == (2 * 3, 4)  # (N * Kmax, T)
    expected = torch.tensor(
        [[0, 1, 2, 3], [1, 2, 4, 5], [0, 1, 2, 3], [0, 0, 1, 6], [0, 0, 1, 7], [0, 0, 1, 8]]
    )
    assert torch.equal(batch["input_ids"], expected)  # row 2 is absent: a copy of the group's first row
    assert bool(batch["attention_mask"][:, -1].all())  # the last column is a real token in every row
    assert torch.equal(batch["ranks"], torch.tensor([[0, 1, -1], [1, 0, 1]]))
    with pytest.raises(DataError, match="comparison 0"):
        collate_rm([([1], [[2], [3]], [0])], pad_id=0)


def test_collate_prompts_left_pads():
    batch = collate_prompts([[1, 5, 6], [1, 7]], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6], [0, 1, 7]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 1, 1]]))


def test_max_len_is_a_data_error_naming_the_example():
    with pytest.raises(DataError, match=r"example 1 is 5 tokens long, more than max_len=4"):
        collate_lm([([1, 2], 1), ([1, 2, 3, 4, 5], 1)], pad_id=0, max_len=4)
    with pytest.raises(DataError, match="prompt 0"):
        collate_prompts([[1, 2, 3]], pad_id=0, max_len=2)
    with pytest.raises(DataError, match="comparison row"):
        collate_rm([([1, 2], [[3, 4], [5]], [0, 1])], pad_id=0, max_len=3)


def test_left_padded_forward_matches_unpadded_forward(tok):
    # A row's logits must not depend on its left padding (mask and position ids right). RoPE is
    # relative, so here it is the mask that matters: without it the padded row differs by ~0.6.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(presets.build_config("tiny", tok)).eval()
    short, long = template_ids(tok, "Hi"), template_ids(tok, "Write a short story about Tilo and a kite.")
    batch = collate_prompts([short, long], pad_id=tok.pad_token_id)
    with torch.no_grad():
        padded = model(**batch).logits[0, -1]  # (V,)
        alone = model(input_ids=torch.tensor([short])).logits[0, -1]  # (V,)
    assert torch.allclose(padded, alone, atol=1e-5)


class CharTokenizer:
    """A stand-in tokenizer: BOS 1, EOS 2, character i of a text -> id 10 + i (enough for windowing)."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=False):
        return [10 + i for i in range(len(text))]


def test_text_windows_cut_documents_and_drop_lone_tokens():
    tok = CharTokenizer()
    # "abcdefgh" -> [1, 10..17, 2] (10 ids) -> windows of 4, 4 and 2
    assert text_windows(tok, ["abcdefgh"], 4) == [[1, 10, 11, 12], [13, 14, 15, 16], [17, 2]]
    # "abc" -> [1, 10, 11, 12, 2]: the lone EOS of the second window has nothing to predict
    assert text_windows(tok, ["abc", "x"], 4) == [[1, 10, 11, 12], [1, 10, 2]]
    assert text_windows(tok, ["abc"], 16) == [[1, 10, 11, 12, 2]]
