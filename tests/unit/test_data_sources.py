"""Where data comes from: ``datasets`` save_to_disk directories (read with pyarrow alone), the data.dir
layout with .parquet or .jsonl, and explicit ``data.<kind>`` paths with ``{split}``.

The save_to_disk fixtures are written here with pyarrow in the layout ``datasets`` uses: a Dataset
directory holds ``data-XXXXX-of-YYYYY.arrow`` shards (Arrow IPC *stream* format), ``state.json`` listing
them under ``_data_files`` and ``dataset_info.json``; a DatasetDict directory holds ``dataset_dict.json``
(``{"splits": [...]}``) and one Dataset directory per split.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.cli import main
from trainers.data import kind_paths, read_conversations, read_records, validate_files
from trainers.data.io import data_path
from trainers.errors import ConfigError, DataError


def U(text):  # noqa: N802
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def write_dataset(path: Path, rows: list[dict], shards: int = 1, split: str | None = None) -> Path:
    """A save_to_disk Dataset directory holding ``rows`` in ``shards`` Arrow stream files."""
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    per = -(-len(rows) // shards)
    names = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        names.append(name)
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * per, per))
    features = {name: {"_type": "Value", "dtype": "string"} for name in table.column_names}
    (path / "dataset_info.json").write_text(json.dumps({"citation": "", "features": features}))
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    (path / "state.json").write_text(json.dumps(state, indent=2))
    return path


def write_dataset_dict(path: Path, splits: dict[str, list[dict]]) -> Path:
    """A save_to_disk DatasetDict directory: ``dataset_dict.json`` and one Dataset directory per split."""
    for split, rows in splits.items():
        write_dataset(path / split, rows, split=split)
    (path / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return path


CHAT = [{"messages": [U(f"q{i}"), A(f"a{i}")]} for i in range(5)]


# --------------------------------------------------------------------------------------------------
# save_to_disk directories


def test_dataset_directory_with_shards_reads_in_order_and_names_shard_rows(tmp_path):
    rows = [dict(r) for r in CHAT]
    rows[3] = {"messages": [U("q3"), {"role": "robot", "content": "x"}]}
    bad = write_dataset(tmp_path / "bad", rows, shards=2)
    assert validate_files("demonstrations", [bad]).problem_lines() == [
        f"{bad / 'data-00001-of-00002.arrow'}:1: field 'messages': message 2 has unknown role 'robot'; "
        "roles are system, user, assistant"
    ]
    good = write_dataset(tmp_path / "good", CHAT, shards=2)
    report = validate_files("demonstrations", [good])
    assert report.ok and report.n_files == 2 and report.n_records == 5
    assert read_conversations("demonstrations", [good]) == CHAT


def test_dataset_directory_of_todays_format_reads_like_a_parquet_file(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "user_id": "u"}]
    path = write_dataset(tmp_path / "cmp", rows)
    assert read_records("comparisons", [path]) == rows


def test_dataset_dict_directory_validates_every_split(tmp_path):
    path = write_dataset_dict(tmp_path / "dd", {"train": CHAT[:3], "test": CHAT[3:]})
    assert main(["data", "validate", "--kind", "demonstrations", str(path)]) == 0
    assert read_conversations("demonstrations", [path]) == CHAT


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: (p / "state.json").write_text(json.dumps({"_data_files": []})),
            "{p}: a datasets save_to_disk directory without data files (no data-*.arrow)",
        ),
        (
            lambda p: (p / "dataset_info.json").write_text("{}"),
            "{p}: a datasets save_to_disk directory without data files (no data-*.arrow)",
        ),
        (
            lambda p: (p / "state.json").write_text(
                json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
            ),
            "{p}: state.json lists data-00000-of-00001.arrow, which does not exist",
        ),
        (lambda p: (p / "state.json").write_text("{"), "{p}: state.json is not readable JSON (...)"),
        (
            lambda p: (p / "notes.txt").write_text("x"),
            "{p}: is a directory, expected a data file (.parquet, .jsonl) or a datasets save_to_disk directory",
        ),
    ],
    ids=["empty-data-files", "info-only", "listed-shard-missing", "bad-state-json", "plain-directory"],
)
def test_directory_without_data_is_one_line_naming_it(tmp_path, make, message):
    path = tmp_path / "ds"
    path.mkdir()
    make(path)
    lines = validate_files("prompts", [path]).problem_lines()
    assert len(lines) == 1
    expected = message.format(p=path)
    if expected.endswith("(...)"):
        assert lines[0].startswith(expected[:-4])
    else:
        assert lines == [expected]


def test_dataset_dict_split_without_data_names_the_split(tmp_path):
    path = write_dataset_dict(tmp_path / "dd", {"train": CHAT})
    (path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    (path / "test").mkdir()
    (path / "test" / "state.json").write_text(json.dumps({"_data_files": []}))
    assert validate_files("demonstrations", [path]).problem_lines() == [
        f"{path}: split 'test': a datasets save_to_disk directory without data files (no data-*.arrow)"
    ]


def test_arrow_file_format_and_garbage(tmp_path):
    table = pa.Table.from_pylist([{"text": "hello"}])
    ipc_file = tmp_path / "t.arrow"
    with pa.OSFile(str(ipc_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert read_records("pretrain", [ipc_file]) == [{"text": "hello"}]
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all")
    assert (
        validate_files("pretrain", [junk])
        .problem_lines()[0]
        .startswith(f"{junk}: not a readable Arrow file (")
    )


# --------------------------------------------------------------------------------------------------
# kind_paths: data.dir layout and data.<kind>


def _cfg(**kw) -> SimpleNamespace:
    base = {"dir": None, "demonstrations": None, "comparisons": None, "prompts": None, "pretrain": None}
    return SimpleNamespace(**(base | kw))


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_dir_finds_parquet_jsonl_or_dataset_directory(tmp_path):
    parquet = tmp_path / "prompts" / "train.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a"]}), parquet)
    jsonl = _jsonl(tmp_path / "demonstrations" / "valid.jsonl", [{"prompt": "p", "response": "r"}])
    ds = write_dataset(tmp_path / "comparisons" / "test", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    cfg = _cfg(dir=str(tmp_path))
    assert kind_paths(cfg, "prompts", "train") == [parquet]
    assert kind_paths(cfg, "demonstrations", "valid") == [jsonl]
    assert kind_paths(cfg, "comparisons", "test") == [ds]
    assert read_conversations("comparisons", kind_paths(cfg, "comparisons", "test"))[0]["responses"] == [
        "a",
        "b",
    ]
    # The old resolver of the stages sees the same files, and keeps its .parquet path when none exists.
    assert data_path(tmp_path, "demonstrations", "valid") == jsonl
    assert data_path(tmp_path, "pretrain", "train") == tmp_path / "pretrain" / "train.parquet"


def test_data_dir_with_a_dataset_dict_per_kind_and_the_validation_alias(tmp_path):
    write_dataset_dict(tmp_path / "demonstrations", {"train": CHAT[:2], "validation": CHAT[2:]})
    cfg = _cfg(dir=str(tmp_path))
    assert kind_paths(cfg, "demonstrations", "train") == [tmp_path / "demonstrations" / "train"]
    assert kind_paths(cfg, "demonstrations", "valid") == [tmp_path / "demonstrations" / "validation"]
    assert read_conversations("demonstrations", kind_paths(cfg, "demonstrations", "valid")) == CHAT[2:]


def test_data_dir_nothing_there_is_one_line_naming_what_was_looked_for(tmp_path):
    with pytest.raises(DataError) as info:
        kind_paths(_cfg(dir=str(tmp_path)), "demonstrations", "valid")
    base = tmp_path / "demonstrations"
    assert str(info.value) == (
        f"{base}/valid.parquet: file not found (nor valid.jsonl or a datasets save_to_disk directory valid/ "
        f"in {base}; data.demonstrations can name another path)"
    )


def test_data_dir_with_parquet_and_jsonl_is_ambiguous(tmp_path):
    base = tmp_path / "prompts"
    _jsonl(base / "train.jsonl", [{"prompt": "a"}])
    pq.write_table(pa.table({"prompt": ["a"]}), base / "train.parquet")
    expected = (
        f"{base}/train.parquet and {base}/train.jsonl both hold prompts data for split 'train'; keep one"
    )
    with pytest.raises(DataError) as info:
        kind_paths(_cfg(dir=str(tmp_path)), "prompts", "train")
    assert str(info.value) == expected
    with pytest.raises(DataError):
        data_path(tmp_path, "prompts", "train")


def test_no_data_dir_and_no_kind_path_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"data.dir is not set: .* or the prompts data's own path as data.prompts"
    ):
        kind_paths(_cfg(), "prompts", "train")


def test_explicit_path_with_split_placeholder(tmp_path):
    for split in ("train", "test"):
        _jsonl(tmp_path / "mine" / f"cmp-{split}.jsonl", [{"prompt": split, "chosen": "a", "rejected": "b"}])
    cfg = _cfg(dir=str(tmp_path / "elsewhere"), comparisons=str(tmp_path / "mine" / "cmp-{split}.jsonl"))
    assert kind_paths(cfg, "comparisons", "test") == [tmp_path / "mine" / "cmp-test.jsonl"]
    with pytest.raises(DataError) as info:
        kind_paths(cfg, "comparisons", "valid")
    assert str(info.value) == (
        f"{tmp_path / 'mine' / 'cmp-valid.jsonl'}: file not found (data.comparisons={cfg.comparisons})"
    )


def test_explicit_dataset_dict_without_split_gives_the_split_directory(tmp_path):
    dd = write_dataset_dict(tmp_path / "hf", {"train": CHAT[:4], "test": CHAT[4:]})
    cfg = _cfg(demonstrations=str(dd))
    assert kind_paths(cfg, "demonstrations", "test") == [dd / "test"]
    assert read_conversations("demonstrations", kind_paths(cfg, "demonstrations", "train")) == CHAT[:4]
    with pytest.raises(DataError) as info:
        kind_paths(cfg, "demonstrations", "valid")
    assert (
        str(info.value)
        == f"{dd}: the DatasetDict of data.demonstrations has no split 'valid' (splits: train, test)"
    )


def test_explicit_single_file_serves_every_split(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    cfg = _cfg(prompts=str(path))
    assert kind_paths(cfg, "prompts", "train") == kind_paths(cfg, "prompts", "test") == [path]
