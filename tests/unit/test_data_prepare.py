"""InstructGPT data hygiene: prefix dedup, per-user cap, split by user, atomic and refusing output."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from trainers.data import prepare, read_records, write_jsonl
from trainers.data.prepare import (
    assign_users,
    cap_per_user,
    dedup_by_prefix,
    normalise,
    prefix_key,
    user_keys,
    user_split_counts,
)
from trainers.errors import DataError, UserError

LONG = "Write a short poem about the sea, the wind and the gulls that fly over the harbour at dawn"


def test_normalise_lowercases_and_collapses_whitespace():
    assert normalise("  Hello\t\tWORLD \n again ") == "hello world again"
    assert prefix_key("A  B c", 3) == "a b"
    assert prefix_key("Hi", 64) == "hi"


def test_dedup_drops_prompts_sharing_a_long_prefix_even_across_case_and_spacing():
    texts = [
        LONG,
        LONG.upper().replace(" ", "   ") + " please",  # same first 64 chars after normalisation
        LONG[:40] + " something else entirely, different within the first sixty-four characters",
        LONG + " -- with a different ending",
    ]
    assert len(normalise(LONG)) > 64
    assert dedup_by_prefix(texts, 64) == [0, 2]
    assert dedup_by_prefix(texts, 0) == [0, 1, 2, 3]  # 0 disables dedup
    assert dedup_by_prefix(texts, 1000) == [0, 1, 2, 3]  # whole texts differ


def test_short_prompts_compare_by_whole_text():
    texts = ["Hi", " hi ", "Hi there", "hi\nthere", "Hi there, friend"]
    assert dedup_by_prefix(texts, 64) == [0, 2, 4]


def test_cap_keeps_the_first_records_of_each_user():
    users = user_keys([{"user_id": "a"}, {"user_id": "a"}, {}, {"user_id": "b"}, {"user_id": "a"}, {}])
    assert cap_per_user(users, 2) == [0, 1, 2, 3, 5]
    assert cap_per_user(users, 1) == [0, 2, 3, 5]  # records without user_id are users of their own
    assert cap_per_user(users, 0) == [0, 1, 2, 3, 4, 5]


def test_int_and_string_user_ids_are_one_user():
    assert user_keys([{"user_id": 7}, {"user_id": "7"}]) == [("user", "7"), ("user", "7")]


@pytest.mark.parametrize(
    ("n_users", "expected"),
    [(60, (48, 6, 6)), (10, (8, 1, 1)), (3, (1, 1, 1)), (2, (1, 0, 1)), (1, (1, 0, 0)), (0, (0, 0, 0))],
)
def test_split_sizes(n_users, expected):
    assert user_split_counts(n_users, 0.1, 0.1) == expected


def test_assign_users_is_independent_of_record_order():
    users = [("user", str(i)) for i in range(40)]
    shuffled = users[:]
    random.Random(3).shuffle(shuffled)
    assert assign_users(users, 0.2, 0.2, seed=5) == assign_users(shuffled, 0.2, 0.2, seed=5)
    assert assign_users(users, 0.2, 0.2, seed=5) != assign_users(users, 0.2, 0.2, seed=6)


def _dataset(n_records: int = 500, n_users: int = 60, seed: int = 0) -> list[dict]:
    """Prompts from ``n_users`` users (a few without id), one heavy user, some near-duplicates."""
    rng = random.Random(seed)
    records = []
    for i in range(n_records):
        record = {"prompt": f"Question number {i}: what is {rng.randint(0, 10**9)} plus {i}?"}
        if i % 25 != 0:  # every 25th record has no user_id
            record["user_id"] = 0 if i % 3 == 0 else rng.randrange(1, n_users)  # user 0 is heavy
        records.append(record)
    # Near-duplicates of earlier prompts: same text, different case and spacing, new ending.
    for i in range(0, 100, 10):
        dup = "  " + records[i]["prompt"].upper().replace(" ", "  ") + " " + "x" * 80
        records.append({"prompt": dup, "user_id": 1})
    return records


def _read_split(out, split):
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def test_prepare_end_to_end_no_user_in_two_splits(tmp_path):
    records = _dataset()
    src = tmp_path / "in.jsonl"
    write_jsonl(src, records)
    out = tmp_path / "out"
    counts = prepare("prompts", [src], out, prefix_chars=20, max_per_user=50, seed=1)

    assert counts["read"] == 510
    # Normalised, the first 20 characters are "question number N: w" (N < 10), "question number NN: "
    # or "question number NNN:": distinct for the 500 originals, and shared by each of the 10
    # near-duplicates with the original it copies. So exactly those 10 go.
    assert counts["duplicates_dropped"] == 10
    assert counts["kept"] == counts["read"] - counts["duplicates_dropped"] - counts["capped"]
    assert counts["capped"] > 0  # user 0 has ~160 records

    seen = {}
    total = anonymous = 0
    for split in ("train", "valid", "test"):
        rows = _read_split(out, split)
        assert len(rows) == counts[split] > 0
        assert not any(r["prompt"].endswith("x" * 80) for r in rows)  # no near-duplicate is kept
        total += len(rows)
        users = {r["user_id"] for r in rows if r["user_id"] is not None}
        anonymous += sum(1 for r in rows if r["user_id"] is None)
        assert counts[f"{split}_users"] == len(users) + sum(1 for r in rows if r["user_id"] is None)
        for user in users:
            assert seen.setdefault(user, split) == split, f"user {user} in {seen[user]} and {split}"
        assert sum(1 for r in rows if r["user_id"] == 0) <= 50
    assert total == counts["kept"]
    assert anonymous > 0 and len(seen) > 50


def test_prepare_default_prefix_catches_case_and_whitespace_duplicates(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(
        src, [{"prompt": LONG, "user_id": 1}, {"prompt": LONG.upper() + "!!", "user_id": 2}, {"prompt": "Hi"}]
    )
    counts = prepare("prompts", [src], tmp_path / "out", valid_frac=0.0, test_frac=0.0)
    assert counts["duplicates_dropped"] == 1 and counts["train"] == 2
    assert [r["prompt"] for r in _read_split(tmp_path / "out", "train")] == [LONG, "Hi"]


def test_prepare_is_deterministic_for_a_seed(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, _dataset(200, 30))
    a = prepare("prompts", [src], tmp_path / "a", seed=7)
    b = prepare("prompts", [src], tmp_path / "b", seed=7)
    prepare("prompts", [src], tmp_path / "c", seed=8)
    assert a == b
    for split in ("train", "valid", "test"):
        assert _read_split(tmp_path / "a", split) == _read_split(tmp_path / "b", split)
    assert any(_read_split(tmp_path / "a", s) != _read_split(tmp_path / "c", s) for s in ("valid", "test"))


def test_prepare_comparisons_round_trip_through_the_validated_reader(tmp_path):
    src = tmp_path / "in.jsonl"
    recs = [
        {"prompt": f"prompt {i}", "responses": ["a", "b", "c"], "ranking": [1, 0, 1], "user_id": i % 4}
        for i in range(12)
    ]
    write_jsonl(src, recs)
    counts = prepare("comparisons", [src], tmp_path / "out", seed=0)
    back = []
    for split in ("train", "valid", "test"):
        if counts[split]:
            back += read_records("comparisons", [tmp_path / "out" / f"{split}.parquet"])
    assert sorted(back, key=lambda r: r["prompt"]) == sorted(recs, key=lambda r: r["prompt"])


def test_pretrain_dedups_on_text_and_mixed_user_ids_become_strings(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(
        src,
        [{"text": "Alpha beta", "user_id": 7}, {"text": "ALPHA  beta"}, {"text": "gamma", "user_id": "x"}],
    )
    counts = prepare("pretrain", [src], tmp_path / "out", valid_frac=0.0, test_frac=0.0)
    assert counts["duplicates_dropped"] == 1
    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert str(table.schema.field("user_id").type) == "string"
    assert table.to_pylist() == [{"text": "Alpha beta", "user_id": "7"}, {"text": "gamma", "user_id": "x"}]


def test_empty_splits_share_the_schema_of_the_data(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "one", "user_id": 1, "task": "qa"}])
    counts = prepare("prompts", [src], tmp_path / "out")
    assert (counts["train"], counts["valid"], counts["test"]) == (1, 0, 0)
    for split in ("valid", "test"):
        assert pq.read_table(tmp_path / "out" / f"{split}.parquet").column_names == [
            "prompt",
            "user_id",
            "task",
        ]


def test_refuses_existing_output_unless_overwrite(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "out"
    prepare("prompts", [src], out)
    before = (out / "train.parquet").read_bytes()
    with pytest.raises(UserError) as info:
        prepare("prompts", [src], out)
    assert info.value.lines == [
        f"--out {out} already holds train.parquet, valid.parquet, test.parquet; pass --overwrite to replace them"
    ]
    assert (out / "train.parquet").read_bytes() == before
    write_jsonl(src, [{"prompt": "c"}, {"prompt": "d"}, {"prompt": "e"}])
    counts = prepare("prompts", [src], out, overwrite=True)
    assert counts["read"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet", "valid.parquet"]


def test_other_files_in_output_dir_are_fine(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_jsonl(src, [{"prompt": "a"}])
    out.mkdir()
    (out / "README").write_text("notes")
    prepare("prompts", [src], out)
    assert (out / "train.parquet").exists() and (out / "README").read_text() == "notes"


def test_nothing_written_on_invalid_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare("prompts", [src], out)
    assert info.value.lines == [f"{src}:2: field 'prompt': expected a string, got integer"]
    assert not out.exists()
    out.mkdir()
    with pytest.raises(DataError):
        prepare("prompts", [src], out)
    assert list(out.iterdir()) == []


def test_unwritable_or_non_directory_output(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "a"}])
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^--out .*file\.txt exists and is not a directory$"):
        prepare("prompts", [src], blocker)
    with pytest.raises(UserError, match=r"^cannot write to output directory .*file\.txt/sub: "):
        prepare("prompts", [src], blocker / "sub")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix_chars": -1}, "--prefix-chars must be >= 0"),
        ({"max_per_user": -5}, "--max-per-user must be >= 0"),
        ({"valid_frac": 1.0}, "--valid-frac must be in [0, 1)"),
        ({"valid_frac": 0.5, "test_frac": 0.5}, "--valid-frac + --test-frac must be < 1"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, options, message):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "a"}])
    with pytest.raises(UserError) as info:
        prepare("prompts", [src], tmp_path / "out", **options)
    assert str(info.value).startswith(message)
    assert not (tmp_path / "out").exists()
