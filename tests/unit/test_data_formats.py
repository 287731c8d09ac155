"""Data formats per kind (messages, chosen/rejected, K-way, prompts with extra fields), detected per file,
and the canonical conversations :func:`read_conversations` returns; each bad input with its exact line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.data import prepare, read_conversations, read_records, validate_files
from trainers.data.schema import key_text
from trainers.errors import DataError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": _jsonl, "parquet": _parquet}


def U(text):  # noqa: N802 - reads like a role
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def S(text):  # noqa: N802
    return {"role": "system", "content": text}


def _write(tmp_path: Path, suffix: str, rows: list) -> Path:
    return WRITERS[suffix](tmp_path / f"data.{suffix}", rows)


# --------------------------------------------------------------------------------------------------
# Good files of every format, read as conversations


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_demonstrations_messages_multi_turn_with_system(tmp_path, suffix):
    convo = [S("Be brief."), U("Hi"), A("Hello."), U("Name a colour."), A("Blue.")]
    # Content before role, as datasets writes the struct: the canonical dict is role, content.
    rows = [{"messages": [{"content": m["content"], "role": m["role"]} for m in convo], "user_id": "u1"}]
    path = _write(tmp_path, suffix, rows)
    got = read_conversations("demonstrations", [path])
    assert got == [{"messages": convo, "user_id": "u1"}]
    assert list(got[0]["messages"][0]) == ["role", "content"]
    assert read_records("demonstrations", [path]) == [{"messages": convo, "user_id": "u1"}]


def test_demonstrations_prompt_response_become_user_and_assistant_turns(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Write a haiku.", "response": "Leaves fall.", "task": "gen"}]
    )
    assert read_conversations("demonstrations", [path]) == [
        {"messages": [U("Write a haiku."), A("Leaves fall.")], "task": "gen"}
    ]
    # The validated reader keeps today's shape for today's format.
    assert read_records("demonstrations", [path]) == [
        {"prompt": "Write a haiku.", "response": "Leaves fall.", "task": "gen"}
    ]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_comparisons_chosen_rejected_strings(tmp_path, suffix):
    path = _write(
        tmp_path, suffix, [{"prompt": "Pick.", "chosen": "good", "rejected": "bad", "user_id": "7"}]
    )
    assert read_conversations("comparisons", [path]) == [
        {"messages": [U("Pick.")], "responses": ["good", "bad"], "ranking": [0, 1], "user_id": "7"}
    ]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_comparisons_trl_conversational_form(tmp_path, suffix):
    rows = [
        {"prompt": [S("sys"), U("Q?")], "chosen": [A("yes")], "rejected": [A("no")]},
        # Whole conversations that start with the prompt's turns are accepted too.
        {
            "prompt": [S("sys"), U("Q2?")],
            "chosen": [S("sys"), U("Q2?"), A("right")],
            "rejected": [S("sys"), U("Q2?"), A("wrong")],
        },
    ]
    path = _write(tmp_path, suffix, rows)
    assert validate_files("comparisons", [path]).warnings == []
    assert read_conversations("comparisons", [path]) == [
        {"messages": [S("sys"), U("Q?")], "responses": ["yes", "no"], "ranking": [0, 1]},
        {"messages": [S("sys"), U("Q2?")], "responses": ["right", "wrong"], "ranking": [0, 1]},
    ]


def test_comparisons_full_conversation_with_a_string_prompt(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": "Q?", "chosen": [U("Q?"), A("yes")], "rejected": "no"}])
    assert read_conversations("comparisons", [path])[0]["responses"] == ["yes", "no"]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_comparisons_k_way_with_a_message_list_prompt(tmp_path, suffix):
    rows = [{"prompt": [U("a"), A("b"), U("c")], "responses": ["x", "y", "z"], "ranking": [2, 0, 1]}]
    path = _write(tmp_path, suffix, rows)
    assert read_conversations("comparisons", [path]) == [
        {"messages": [U("a"), A("b"), U("c")], "responses": ["x", "y", "z"], "ranking": [2, 0, 1]}
    ]


def test_comparisons_k_way_string_prompt_is_one_user_turn(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}])
    assert read_conversations("comparisons", [path]) == [
        {"messages": [U("p")], "responses": ["a", "b"], "ranking": [1, 0]}
    ]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_prompts_extra_columns_are_kept_and_passed_along(tmp_path, suffix):
    rows = [
        {"prompt": "2+2?", "answer": "4", "solution": "4", "difficulty": 1},
        {"prompt": "3+3?", "solution": "6", "difficulty": 2},
    ]
    path = _write(tmp_path, suffix, rows)
    report = validate_files("prompts", [path])
    where = f"{path}" if suffix == "parquet" else f"{path}:1"
    assert report.ok and report.warnings == [
        f"{where}: field 'solution': extra field (kept)",
        f"{where}: field 'difficulty': extra field (kept)",
    ]
    got = read_conversations("prompts", [path])
    assert got[0] == {
        "messages": [U("2+2?")],
        "prompt": "2+2?",
        "answer": "4",
        "solution": "4",
        "difficulty": 1,
    }
    # Parquet cannot tell a null from an absent value: the missing answer is dropped like any optional.
    assert got[1] == {"messages": [U("3+3?")], "prompt": "3+3?", "solution": "6", "difficulty": 2}
    assert read_records("prompts", [path])[0]["solution"] == "4"


def test_prompts_messages_and_message_list_prompts(tmp_path):
    messages = _jsonl(tmp_path / "m.jsonl", [{"messages": [S("s"), U("first"), A("ok"), U("last")], "id": 3}])
    assert read_conversations("prompts", [messages]) == [
        {"messages": [S("s"), U("first"), A("ok"), U("last")], "prompt": "last", "id": 3}
    ]
    listed = _jsonl(tmp_path / "p.jsonl", [{"prompt": [U("q")]}])
    assert read_conversations("prompts", [listed]) == [{"messages": [U("q")], "prompt": [U("q")]}]


def test_pretrain_text(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "Once."}])
    assert read_conversations("pretrain", [path]) == [{"text": "Once."}]


def test_files_of_different_formats_can_be_read_together(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    b = _parquet(tmp_path / "b.parquet", [{"messages": [U("q"), A("s")]}])
    assert read_conversations("demonstrations", [a, b]) == [
        {"messages": [U("p"), A("r")]},
        {"messages": [U("q"), A("s")]},
    ]


# --------------------------------------------------------------------------------------------------
# Bad records: (id, kind, rows, expected first problem line after "PATH:")

BAD = [
    (
        "unknown_role",
        "demonstrations",
        [{"messages": [U("hi"), {"role": "tool", "content": "x"}, A("ok")]}],
        "1: field 'messages': message 2 has unknown role 'tool'; roles are system, user, assistant",
    ),
    (
        "no_final_assistant",
        "demonstrations",
        [{"messages": [U("hi"), A("ok"), U("and?")]}],
        "1: field 'messages': ends with a user turn; it must end with an assistant turn",
    ),
    (
        "no_user_turn",
        "demonstrations",
        [{"messages": [S("s"), A("ok")]}],
        "1: field 'messages': no user turn before the final assistant turn",
    ),
    (
        "system_not_first",
        "demonstrations",
        [{"messages": [U("hi"), S("s"), A("ok")]}],
        "1: field 'messages': message 2 has role 'system'; a system turn may only come first",
    ),
    (
        "message_not_object",
        "demonstrations",
        [{"messages": ["hi", A("ok")]}],
        "1: field 'messages': message 1 is string, expected an object with 'role' and 'content'",
    ),
    (
        "message_without_content",
        "demonstrations",
        [{"messages": [{"role": "user"}, A("ok")]}],
        "1: field 'messages': message 1 has no 'content'",
    ),
    (
        "content_not_string",
        "demonstrations",
        [{"messages": [{"role": "user", "content": [{"type": "text"}]}, A("ok")]}],
        "1: field 'messages': message 1: 'content' is list, expected a string",
    ),
    (
        "message_extra_key",
        "demonstrations",
        [{"messages": [U("hi"), {"role": "assistant", "content": "ok", "weight": 0}]}],
        "1: field 'messages': message 2 has unknown key 'weight'; a message is {role, content}",
    ),
    (
        "empty_content",
        "demonstrations",
        [{"messages": [U("  "), A("ok")]}],
        "1: field 'messages': message 1 (user) has empty or whitespace-only content",
    ),
    (
        "messages_not_list",
        "demonstrations",
        [{"messages": "hi"}],
        "1: field 'messages': expected a list of messages, got string",
    ),
    (
        "messages_empty",
        "demonstrations",
        [{"messages": []}],
        "1: field 'messages': empty list; expected at least one message",
    ),
    (
        "both_formats_in_one_record",
        "demonstrations",
        [{"messages": [U("q"), A("a")], "prompt": "q"}],
        "1: field 'messages': given together with 'prompt'; a record is in one format: prompt/response or messages",
    ),
    (
        "mixed_formats_in_one_file",
        "demonstrations",
        [{"prompt": "p", "response": "r"}, {"messages": [U("q"), A("a")]}],
        "2: field 'messages': a messages record in a file of prompt/response records (record 1); one file holds one format",
    ),
    (
        "mixed_comparison_formats",
        "comparisons",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]},
        ],
        "2: field 'responses': a responses/ranking record in a file of chosen/rejected records (record 1); one file holds one format",
    ),
    (
        "chosen_equals_rejected",
        "comparisons",
        [{"prompt": "p", "chosen": "same", "rejected": "same "}],
        "1: field 'rejected': same text as 'chosen'; a comparison needs two different responses",
    ),
    (
        "chosen_equals_rejected_as_messages",
        "comparisons",
        [{"prompt": [U("p")], "chosen": [A("same")], "rejected": [U("p"), A("same")]}],
        "1: field 'rejected': same text as 'chosen'; a comparison needs two different responses",
    ),
    (
        "prefix_mismatch",
        "comparisons",
        [{"prompt": [U("p")], "chosen": [U("other"), A("a")], "rejected": [A("b")]}],
        "1: field 'chosen': its first 1 turns do not match 'prompt'; give the assistant turn alone or the "
        "whole conversation starting with the prompt's turns",
    ),
    (
        "chosen_ends_with_user",
        "comparisons",
        [{"prompt": "p", "chosen": [A("a"), U("b")], "rejected": "c"}],
        "1: field 'chosen': ends with a user turn; it must end with an assistant turn",
    ),
    (
        "rejected_missing",
        "comparisons",
        [{"prompt": "p", "chosen": "a"}],
        "1: field 'rejected': missing",
    ),
    (
        "comparison_prompt_ends_with_assistant",
        "comparisons",
        [{"prompt": [U("p"), A("x")], "responses": ["a", "b"], "ranking": [0, 1]}],
        "1: field 'prompt': ends with an assistant turn; it must end with a user turn",
    ),
    (
        "prompts_messages_end_with_assistant",
        "prompts",
        [{"messages": [U("q"), A("a")]}],
        "1: field 'messages': ends with an assistant turn; it must end with a user turn",
    ),
    (
        "demonstration_prompt_list",
        "demonstrations",
        [{"prompt": [U("q")], "response": "r"}],
        "1: field 'prompt': expected a string, got list",
    ),
]


@pytest.mark.parametrize(("kind", "rows", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_record_gives_its_exact_line(tmp_path, kind, rows, expected):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    report = validate_files(kind, [path])
    assert report.problems[0] == f"{path}:{expected}"
    with pytest.raises(DataError) as info:
        read_conversations(kind, [path])
    assert str(info.value) == f"{path}:{expected}"


def test_parquet_with_both_formats_columns_is_checked_row_by_row(tmp_path):
    path = _parquet(
        tmp_path / "mixed.parquet",
        [
            {"prompt": "p", "response": "r", "messages": None},
            {"prompt": None, "response": None, "messages": [U("q"), A("a")]},
        ],
    )
    assert validate_files("demonstrations", [path]).problem_lines() == [
        f"{path}:2: field 'messages': a messages record in a file of prompt/response records (record 1); "
        "one file holds one format"
    ]


def test_parquet_messages_column_of_the_wrong_type(tmp_path):
    path = _parquet(tmp_path / "m.parquet", [{"messages": ["hi", "there"]}])
    assert validate_files("demonstrations", [path]).problem_lines() == [
        f"{path}: field 'messages': column type list<string>, expected list<struct<role: string, content: string>>"
    ]


def test_parquet_missing_column_of_the_files_format(tmp_path):
    path = _parquet(tmp_path / "c.parquet", [{"prompt": "p", "chosen": "a"}])
    assert validate_files("comparisons", [path]).problem_lines() == [
        f"{path}: field 'rejected': missing column"
    ]


def test_null_message_keys_from_arrow_structs_are_ignored(tmp_path):
    # A struct column that another row filled with an extra key holds null there.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q", "name": None},
                {"role": "assistant", "content": "a", "name": None},
            ]
        }
    ]
    path = _parquet(tmp_path / "m.parquet", rows)
    assert read_conversations("demonstrations", [path]) == [{"messages": [U("q"), A("a")]}]


# --------------------------------------------------------------------------------------------------
# prepare on the new formats


def test_key_text_skips_system_turns_and_the_reply():
    convo = {"messages": [S("You are helpful."), U("Tell me"), A("a story")]}
    assert key_text("demonstrations", convo) == "Tell me"
    assert key_text("prompts", {"messages": [S("s"), U("a"), A("b"), U("c")]}) == "a\nb\nc"
    assert key_text("comparisons", {"prompt": [U("q")], "chosen": "x", "rejected": "y"}) == "q"
    assert key_text("prompts", {"prompt": "plain"}) == "plain"


def test_prepare_messages_dedups_on_the_prompt_turns_and_round_trips(tmp_path):
    system = S("You are a helpful assistant that answers questions about the animals of the world.")
    rows = [
        {
            "messages": [system, U(f"Question number {i}: what colour is the fox?"), A(f"Red {i}.")],
            "user_id": f"u{i}",
        }
        for i in range(6)
    ]
    rows.append(
        {"messages": [system, U("Question number 0: what colour is the fox?"), A("Copy.")], "user_id": "u9"}
    )
    src = _jsonl(tmp_path / "in.jsonl", rows)
    counts = prepare(
        "demonstrations", [src], tmp_path / "out", prefix_chars=64, valid_frac=0.2, test_frac=0.2
    )
    assert counts["read"] == 7 and counts["duplicates_dropped"] == 1  # the shared system turn is no key
    splits = [tmp_path / "out" / f"{s}.parquet" for s in ("train", "valid", "test")]
    assert pq.read_schema(splits[0]).field("messages").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    back = read_conversations("demonstrations", splits)
    assert sorted(r["user_id"] for r in back) == [f"u{i}" for i in range(6)]
    assert all(r["messages"][0] == system for r in back)


def test_prepare_keeps_extra_prompt_fields_and_mixed_string_and_list_prompts(tmp_path):
    src = _jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "first", "solution": "1"}, {"prompt": [S("s"), U("second")], "solution": "2"}],
    )
    prepare("prompts", [src], tmp_path / "out", valid_frac=0, test_frac=0)
    back = read_conversations("prompts", [tmp_path / "out" / "train.parquet"])
    # A string prompt in a message-list column is written as its one user turn: the same conversation.
    assert back == [
        {"messages": [U("first")], "prompt": [U("first")], "solution": "1"},
        {"messages": [S("s"), U("second")], "prompt": [S("s"), U("second")], "solution": "2"},
    ]


def test_prepare_refuses_inputs_of_two_formats(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"messages": [U("q"), A("s")]}])
    with pytest.raises(DataError, match="mix the prompt/response and messages formats"):
        prepare("demonstrations", [a, b], tmp_path / "out")
    assert not (tmp_path / "out" / "train.parquet").exists()
