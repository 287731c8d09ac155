"""The chat format (trainers.data.chat) on tokenizers shaped like real chat models (tests/chat_models.py): a
Qwen2.5-like ChatML tokenizer (no BOS, a default system turn, two stop ids) and a Llama-3-like one (BOS
from the template, no PAD, three stop ids). For each: where the prompt ends, that prompt + reply is the
whole rendered conversation token for token, the end-of-turn token, the stop set, the PAD chosen."""

from __future__ import annotations

import random

import pytest

from tests.chat_models import DEFAULT_SYSTEM, FAMILIES, world_texts
from trainers.data import responses, world_text
from trainers.data.chat import ChatFormat, user_turn
from trainers.data.collate import encode_text
from trainers.data.examples import demonstration_examples
from trainers.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    fam = FAMILIES[request.param]
    model_dir = fam.build(tmp_path_factory.mktemp(fam.name), world_texts(n=600))
    tok = load_tokenizer(model_dir)
    return fam, model_dir, ChatFormat.from_tokenizer(tok, model_dir)


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _conversations(n: int = 20, seed: int = 5):
    rng = random.Random(seed)
    for i in range(n):
        p = world_text.sample_prompt(world_text.sample_task(rng), rng)
        r = responses.demonstration(p, rng)
        system = [{"role": "system", "content": "Answer in one sentence."}] if i % 3 == 0 else []
        yield [*system, *user_turn(p)], r


def test_end_of_turn_stop_ids_and_pad(family):
    fam, _, fmt = family
    tok = fmt.tokenizer
    assert fmt.end_of_turn_id == tok.convert_tokens_to_ids(fam.end_of_turn)
    assert set(fmt.stop_ids) == {*_ids(tok, *fam.stop_tokens), fmt.end_of_turn_id, tok.eos_token_id}
    if fam.name == "qwen2.5":
        assert fmt.stop_ids == tuple(sorted(_ids(tok, "<|im_end|>", "<|endoftext|>")))
        assert tok.pad_token == "<|endoftext|>"  # the tokenizer's own (a stop id: masks come from lengths)
    else:
        assert len(fmt.stop_ids) == 3
        assert tok.pad_token == "<|finetune_right_pad_id|>"  # an unused special, not a stop id
        assert fmt.pad_id not in fmt.stop_ids


def test_prompt_plus_reply_is_the_whole_rendered_conversation(family):
    _, _, fmt = family
    tok = fmt.tokenizer
    for messages, reply in _conversations():
        prompt, reply_ids = fmt.reply_ids(messages, reply)
        whole = tok.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)
        whole_ids = tok.encode(whole, add_special_tokens=False)
        assert prompt + reply_ids == whole_ids[: len(prompt) + len(reply_ids)]
        assert reply_ids[-1] == fmt.end_of_turn_id and fmt.end_of_turn_id not in reply_ids[:-1]
        assert tok.decode(reply_ids[:-1]).strip() == reply.strip()
        # the prompt is exactly the template's generation prompt
        gen = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == tok.encode(gen, add_special_tokens=False)


def test_bos_only_where_the_template_puts_it(family):
    fam, _, fmt = family
    tok = fmt.tokenizer
    prompt = fmt.prompt_ids(user_turn("Name a fish."))
    if fam.bos is None:
        assert tok.bos_token_id is None
        assert encode_text(tok, "Tilo.") == [*tok.encode("Tilo.", add_special_tokens=False), tok.eos_token_id]
    else:
        bos = tok.convert_tokens_to_ids(fam.bos)
        assert prompt[0] == bos and prompt.count(bos) == 1  # the template's, not a second from encode


def test_default_system_turn_is_in_the_prompt(family):
    fam, _, fmt = family
    text = fmt.tokenizer.decode(fmt.prompt_ids(user_turn("Name a fish.")))
    if fam.default_system:
        assert DEFAULT_SYSTEM in text
        own = fmt.prompt_ids([{"role": "system", "content": "Be brief."}, *user_turn("Name a fish.")])
        assert DEFAULT_SYSTEM not in fmt.tokenizer.decode(own)
    else:
        assert DEFAULT_SYSTEM not in text


def test_multi_turn_spans_cover_each_reply(family):
    _, _, fmt = family
    conv = [
        *user_turn("Hi."),
        {"role": "assistant", "content": "Hello."},
        *user_turn("Name a fish."),
        {"role": "assistant", "content": "Trout."},
    ]
    ids, spans = fmt.conversation_ids(conv, all_turns=True)
    assert len(spans) == 2
    for (start, end), reply in zip(spans, ("Hello.", "Trout."), strict=True):
        assert ids[end - 1] == fmt.end_of_turn_id
        assert fmt.tokenizer.decode(ids[start : end - 1]).strip() == reply
    whole = fmt.tokenizer.apply_chat_template(conv, tokenize=False)
    assert ids == fmt.tokenizer.encode(whole, add_special_tokens=False)[: len(ids)]


def test_truncation_keeps_the_reply_and_its_end_of_turn(family):
    fam, _, fmt = family
    long = " ".join(["fox"] * 300)
    record = {"messages": [*user_turn(long), {"role": "assistant", "content": "Trout."}]}
    ((ids, n_prompt),), counts = demonstration_examples(fmt, [record], "d", max_len=48, policy="truncate")
    assert counts.truncated == 1 and len(ids) == 48 and ids[-1] == fmt.end_of_turn_id
    assert fmt.tokenizer.decode(ids[n_prompt:-1]).strip() == "Trout."
    if fam.bos is not None:
        assert ids[0] == fmt.tokenizer.bos_token_id


def test_pad_choice_is_saved_with_the_tokenizer(family, tmp_path):
    _, _, fmt = family
    fmt.tokenizer.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert again.pad_token_id == fmt.pad_id and again.chat_template == fmt.tokenizer.chat_template
