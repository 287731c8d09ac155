"""The model's chat format (trainers.data.chat), PAD choice, LM targets from spans and the over-long policy
(trainers.data.examples), on the world's tokenizer; the real-model-shaped families are in
test_chat_families.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from trainers.data import responses, world_text
from trainers.data.chat import ChatError, ChatFormat, eos_ids_of, open_chat_format, user_turn
from trainers.data.collate import IGNORE_INDEX, collate_lm, encode_text
from trainers.data.examples import (
    comparison_examples,
    demonstration_examples,
    prompt_examples,
    report_overlong,
)
from trainers.data.tokenizer import BOS, EOS, format_prompt, load_tokenizer
from trainers.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def fmt(tok_dir):
    return ChatFormat.from_tokenizer(load_tokenizer(tok_dir))


def _conv(*turns: str) -> list[dict]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


# --- the world's format, through the template ---


def test_world_template_gives_the_world_format_and_its_eos_ends_a_turn(fmt):
    tok = fmt.tokenizer
    assert fmt.end_of_turn_id == tok.eos_token_id and fmt.stop_ids == (tok.eos_token_id,)
    assert fmt.pad_id == tok.pad_token_id != tok.eos_token_id
    prompt, reply = fmt.reply_ids(user_turn("Name a fish."), "Trout.")
    assert prompt == [tok.bos_token_id, *tok.encode(format_prompt("Name a fish."), add_special_tokens=False)]
    assert reply == [*tok.encode("Trout.", add_special_tokens=False), tok.eos_token_id]


def test_prompt_plus_reply_is_the_whole_conversation_token_for_token(fmt):
    tok, rng = fmt.tokenizer, random.Random(3)
    for _ in range(30):
        p = world_text.sample_prompt(world_text.sample_task(rng), rng)
        r = responses.demonstration(p, rng)
        prompt, reply = fmt.reply_ids(user_turn(p), r)
        whole = tok.apply_chat_template(_conv(p, r), tokenize=False)
        assert prompt + reply == tok.encode(whole, add_special_tokens=False)


def test_conversation_ids_target_the_final_or_every_reply(fmt):
    conv = _conv("Hi.", "Hello.", "Name a fish.", "Trout.")
    ids, spans = fmt.conversation_ids(conv)
    prompt, reply = fmt.reply_ids(conv[:3], "Trout.")
    assert ids == prompt + reply and spans == [(len(prompt), len(ids))]
    ids_all, spans_all = fmt.conversation_ids(conv, all_turns=True)
    assert ids_all == ids and len(spans_all) == 2 and spans_all[-1] == spans[0]
    first_prompt, first_reply = fmt.reply_ids(conv[:1], "Hello.")
    assert spans_all[0] == (len(first_prompt), len(first_prompt) + len(first_reply))
    assert ids[spans_all[0][1] - 1] == fmt.end_of_turn_id


def test_conversation_errors(fmt):
    with pytest.raises(ChatError, match="does not end with an assistant turn"):
        fmt.conversation_ids(_conv("Hi."))
    with pytest.raises(ChatError, match="cannot render"):  # the world's template has no system role
        fmt.prompt_ids([{"role": "system", "content": "Be brief."}, *user_turn("Hi.")])


def test_missing_or_endless_template_is_one_data_error_naming_the_tokenizer(tok_dir):
    tok = load_tokenizer(tok_dir)
    tok.chat_template = None
    with pytest.raises(
        DataError, match=rf"^{tok_dir}: the tokenizer has no chat template; .*model.chat_template"
    ):
        open_chat_format(tok, tok_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="writes no special token after the assistant's text"):
        open_chat_format(tok, tok_dir)


def test_chat_template_file_replaces_the_tokenizers(tmp_path, tok_dir):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}" + EOS + "{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    fmt = ChatFormat.from_tokenizer(load_tokenizer(tok_dir, template))
    assert fmt.tokenizer.decode(fmt.prompt_ids(user_turn("Hi"))) == f"[user] Hi{EOS}[assistant] "
    with pytest.raises(ConfigError, match="model.chat_template=.*file not found"):
        load_tokenizer(tok_dir, tmp_path / "missing.jinja")


def test_stop_ids_add_the_model_directorys_eos_ids(tmp_path, tok_dir):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_ids_of(tmp_path) == (2, 7, 9)
    assert ChatFormat.from_tokenizer(load_tokenizer(tok_dir), tmp_path).stop_ids == (2, 7, 9)


def test_eos_ids_of_reads_generation_config_and_config(tmp_path):
    (tmp_path / "config.json").write_text('{"eos_token_id": 7}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [9, 7, 8]}')
    assert eos_ids_of(tmp_path) == (7, 8, 9)
    (tmp_path / "generation_config.json").unlink()
    assert eos_ids_of(tmp_path) == (7,)
    (tmp_path / "config.json").write_text("{}")
    assert eos_ids_of(tmp_path) == ()
    (tmp_path / "config.json").write_text('{"eos_token_id": [1, true]}')
    with pytest.raises(ConfigError, match="config.json: eos_token_id must be an int or a list of ints"):
        eos_ids_of(tmp_path)


def test_stop_ids_outside_the_vocabulary_are_refused(tmp_path, tok_dir):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 100000}))
    with pytest.raises(DataError, match="eos_token_id 100000 .* is outside the tokenizer's vocabulary"):
        open_chat_format(load_tokenizer(tok_dir), tok_dir, tmp_path)


# --- PAD ---


def _padless_tokenizer(tmp_path, specials: list[str]):
    """A word-level tokenizer with BOS, EOS, ``specials`` and no PAD, saved and loaded back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "[UNK]", "<|turn|>", *specials, "hi", "there"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        chat_template="{% for m in messages %}<|turn|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|turn|> {% endif %}",
    )
    fast.add_tokens(["<|turn|>", *specials], special_tokens=True)
    fast.save_pretrained(str(tmp_path))
    return load_tokenizer(tmp_path)


def test_a_tokenizer_without_pad_gets_an_unused_pad_or_reserved_token(tmp_path):
    tok = _padless_tokenizer(tmp_path / "a", ["<|reserved_0|>", "<|reserved_1|>"])
    assert tok.pad_token == "<|reserved_0|>"  # not the template's <|turn|>, not BOS/EOS
    assert ChatFormat.from_tokenizer(tok).pad_id == tok.convert_tokens_to_ids("<|reserved_0|>")
    tok = _padless_tokenizer(tmp_path / "b", ["<|reserved_0|>", "<|pad_right|>"])
    assert tok.pad_token == "<|pad_right|>"  # a token named for padding comes first


def test_a_tokenizer_without_pad_or_spare_token_pads_with_eos(tmp_path):
    tok = _padless_tokenizer(tmp_path, [])
    fmt = ChatFormat.from_tokenizer(tok)
    assert tok.pad_token == "</s>" and fmt.pad_id == tok.eos_token_id == fmt.end_of_turn_id


def test_text_ids_without_bos(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert encode_text(tok, "Tilo.")[0] == tok.bos_token_id
    tok.bos_token = None
    assert encode_text(tok, "Tilo.") == [*tok.encode("Tilo.", add_special_tokens=False), tok.eos_token_id]
    assert BOS not in tok.decode(encode_text(tok, "Tilo."))


# --- LM targets from spans ---


def test_collate_lm_labels_only_the_spans():
    batch = collate_lm([([5, 6, 7, 8, 9, 10], [(1, 3), (4, 6)]), ([11, 12], 1)], pad_id=0)
    x = IGNORE_INDEX
    assert torch.equal(batch["labels"], torch.tensor([[x, 6, 7, x, 9, 10], [x, x, x, x, x, 12]]))


# --- over-long examples ---


def _demos(n_long: int, n_short: int) -> list[dict]:
    long, short = " ".join(["fox"] * 300), "Name a fish."
    return [{"messages": _conv(long, "Trout.")}] * n_long + [{"messages": _conv(short, "Trout.")}] * n_short


def test_final_turn_examples_are_prompt_lengths_and_all_turns_spans(fmt):
    conv = {"messages": _conv("Hi.", "Hello.", "Name a fish.", "Trout.")}
    ((ids, n_prompt),), _ = demonstration_examples(fmt, [conv], "d", max_len=256)
    assert (ids, [(n_prompt, len(ids))]) == fmt.conversation_ids(conv["messages"])
    ((ids_all, spans),), _ = demonstration_examples(fmt, [conv], "d", max_len=256, all_turns=True)
    assert ids_all == ids and len(spans) == 2


def test_overlong_drop_counts_and_reports(fmt, capsys):
    examples, counts = demonstration_examples(fmt, _demos(2, 3), "d.jsonl", max_len=64)
    assert len(examples) == 3 and (counts.rows, counts.dropped, counts.truncated) == (5, 2, 0)
    assert report_overlong([counts], "model.max_len=64") == {
        "d.jsonl": {"rows": 5, "dropped": 2, "truncated": 0}
    }
    assert "d.jsonl: 2 of 5 rows longer than model.max_len=64 dropped" in capsys.readouterr().out


def test_overlong_truncate_cuts_the_prompt_from_the_left_keeping_bos_and_the_reply(fmt):
    (short,), _ = demonstration_examples(fmt, _demos(0, 1), "d", max_len=64)
    (cut,), counts = demonstration_examples(fmt, _demos(1, 0), "d", max_len=64, policy="truncate")
    ids, n_prompt = cut
    assert counts.truncated == 1 and len(ids) == 64 and ids[0] == fmt.tokenizer.bos_token_id
    assert ids[n_prompt:] == short[0][short[1] :] and ids[-1] == fmt.end_of_turn_id


def test_overlong_truncate_drops_what_a_reply_alone_overflows(fmt):
    demo = [{"messages": _conv("Hi.", " ".join(["fox"] * 300))}]
    examples, counts = demonstration_examples(fmt, demo, "d", max_len=64, policy="truncate")
    assert examples == [] and counts.dropped == 1


def test_overlong_error_names_each_row(fmt):
    with pytest.raises(DataError) as err:
        demonstration_examples(fmt, _demos(0, 1) + _demos(2, 0), "d.jsonl", max_len=64, policy="error")
    lines = err.value.lines
    assert len(lines) == 2 and lines[0].startswith("d.jsonl:2: prompt + response is ")
    assert lines[0].endswith("more than model.max_len=64")


def test_comparisons_and_prompts_truncate_only_the_prompt(fmt):
    long = " ".join(["fox"] * 300)
    record = {"messages": user_turn(long), "responses": ["Trout.", "A fish called trout."], "ranking": [0, 1]}
    (group,), counts = comparison_examples(fmt, [record], "c", max_len=64, policy="truncate")
    prompt, resp, ranking = group
    assert counts.truncated == 1 and len(prompt) + max(map(len, resp)) == 64 and ranking == [0, 1]
    assert resp == [fmt.reply_ids(user_turn(long), r)[1] for r in record["responses"]]
    ids, kept, counts = prompt_examples(fmt, [record, {"messages": user_turn("Hi")}], "p", room=40)
    assert kept == [1] and counts.dropped == 1 and ids == [fmt.prompt_ids(user_turn("Hi"))]


def test_a_row_the_template_refuses_is_a_problem_line(fmt):
    bad = {"messages": [{"role": "system", "content": "x"}, *_conv("Hi.", "Hello.")]}
    with pytest.raises(DataError, match=r"^d.jsonl:2: the chat template cannot render"):
        demonstration_examples(fmt, [*_demos(0, 1), bad], "d.jsonl", max_len=64)
