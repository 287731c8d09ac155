"""Data schemas, readers and validation: a corpus of bad files, each with its exact problem line."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.data import read_records, read_table, validate_files, write_jsonl, write_parquet
from trainers.data.validate import length_problems
from trainers.errors import DataError

CMP = {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}


def _jsonl(*objs: object) -> str:
    """JSON Lines text of the given values."""
    return "".join(json.dumps(o) + "\n" for o in objs)


def _cmp(**fields) -> str:
    """One comparison line with some fields replaced."""
    return _jsonl({**CMP, **fields})


# (id, kind, file name, content, expected first problem line; "{p}" is the file's path).
# Content: str -> written as text; bytes -> written raw; pa.Table -> written as Parquet; None -> no file;
# "DIR" -> a directory. A line ending in "..." is compared as a prefix.
BAD_FILES = [
    ("missing_file", "prompts", "nope.jsonl", None, "{p}: file not found"),
    (
        "directory",
        "prompts",
        "d.jsonl",
        "DIR",
        "{p}: is a directory, expected a data file (.parquet, .jsonl) or a datasets save_to_disk directory",
    ),
    (
        "bad_extension",
        "prompts",
        "a.csv",
        "prompt\nhello\n",
        "{p}: unsupported file extension '.csv'; expected .parquet, .jsonl, .json or .arrow",
    ),
    ("not_json", "prompts", "a.jsonl", '{"prompt": "a"}\n{"prompt": \n', "{p}:2: not valid JSON (..."),
    (
        "not_object_list",
        "prompts",
        "a.jsonl",
        '{"prompt": "a"}\n["a"]\n',
        "{p}:2: expected a JSON object, got list",
    ),
    ("not_object_string", "prompts", "a.json", '"hello"\n', "{p}:1: expected a JSON object, got string"),
    (
        "json_array_file",
        "prompts",
        "a.json",
        '[\n  {"prompt": "a"}\n]\n',
        "{p}: is a JSON array; expected JSON Lines (one JSON object per line)",
    ),
    ("bad_utf8", "prompts", "a.jsonl", b'{"prompt": "caf\xe9"}\n', "{p}:1: not valid UTF-8 (byte 16)"),
    (
        "record_no_is_line_no",
        "prompts",
        "a.jsonl",
        '{"prompt": "a"}\n\n{"prompt": ""}\n',
        "{p}:3: field 'prompt': empty or whitespace-only string",
    ),
    (
        "missing_field",
        "demonstrations",
        "a.jsonl",
        _jsonl({"prompt": "a"}),
        "{p}:1: field 'response': missing",
    ),
    ("missing_text", "pretrain", "a.jsonl", _jsonl({"prompt": "a"}), "{p}:1: field 'text': missing"),
    (
        "prompt_int",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": 5}),
        "{p}:1: field 'prompt': expected a string, got integer",
    ),
    (
        "prompt_empty",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": ""}),
        "{p}:1: field 'prompt': empty or whitespace-only string",
    ),
    (
        "response_whitespace",
        "demonstrations",
        "a.jsonl",
        _jsonl({"prompt": "a", "response": " \n\t "}),
        "{p}:1: field 'response': empty or whitespace-only string",
    ),
    ("prompt_null", "prompts", "a.jsonl", _jsonl({"prompt": None}), "{p}:1: field 'prompt': null value"),
    (
        "k_below_2",
        "comparisons",
        "a.jsonl",
        _cmp(responses=["a"], ranking=[0]),
        "{p}:1: field 'responses': needs at least 2 responses, got 1",
    ),
    (
        "responses_not_list",
        "comparisons",
        "a.jsonl",
        _cmp(responses="a b"),
        "{p}:1: field 'responses': expected a list of strings, got string",
    ),
    (
        "empty_response_inside",
        "comparisons",
        "a.jsonl",
        _cmp(responses=["a", " "]),
        "{p}:1: field 'responses': response 2 is an empty or whitespace-only string",
    ),
    (
        "int_response_inside",
        "comparisons",
        "a.jsonl",
        _cmp(responses=["a", 3]),
        "{p}:1: field 'responses': response 2 is integer, expected a string",
    ),
    (
        "null_response_inside",
        "comparisons",
        "a.jsonl",
        _cmp(responses=[None, "b"]),
        "{p}:1: field 'responses': response 1 is null",
    ),
    (
        "ranking_floats",
        "comparisons",
        "a.jsonl",
        _cmp(ranking=[0, 1.0]),
        "{p}:1: field 'ranking': ranking not integers (item 2 is number 1.0)",
    ),
    (
        "ranking_strings",
        "comparisons",
        "a.jsonl",
        _cmp(ranking=["0", "1"]),
        "{p}:1: field 'ranking': ranking not integers (item 1 is string '0')",
    ),
    (
        "ranking_bools",
        "comparisons",
        "a.jsonl",
        _cmp(ranking=[True, False]),
        "{p}:1: field 'ranking': ranking not integers (item 1 is boolean True)",
    ),
    (
        "ranking_not_list",
        "comparisons",
        "a.jsonl",
        _cmp(ranking=0),
        "{p}:1: field 'ranking': expected a list of integers, got integer",
    ),
    (
        "ranking_length",
        "comparisons",
        "a.jsonl",
        _cmp(responses=["a", "b", "c"], ranking=[0, 1]),
        "{p}:1: field 'ranking': length 2 does not match the 3 responses",
    ),
    (
        "ranking_all_tied",
        "comparisons",
        "a.jsonl",
        _cmp(ranking=[1, 1]),
        "{p}:1: field 'ranking': no two distinct ranks ([1, 1]); a ranking must prefer at least one response",
    ),
    (
        "ranking_negative",
        "comparisons",
        "a.jsonl",
        _cmp(ranking=[0, -1]),
        "{p}:1: field 'ranking': negative rank -1 (item 2); 0 is the best rank",
    ),
    (
        "ranking_missing",
        "comparisons",
        "a.jsonl",
        _jsonl({"prompt": "p", "responses": ["a", "b"]}),
        "{p}:1: field 'ranking': missing",
    ),
    (
        "user_id_list",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": "a", "user_id": [1]}),
        "{p}:1: field 'user_id': expected a string or integer, got list",
    ),
    (
        "user_id_empty",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": "a", "user_id": ""}),
        "{p}:1: field 'user_id': empty or whitespace-only string",
    ),
    (
        "task_int",
        "demonstrations",
        "a.jsonl",
        _jsonl({"prompt": "a", "response": "b", "task": 3}),
        "{p}:1: field 'task': expected a string, got integer",
    ),
    (
        "options_empty",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": "a", "options": []}),
        "{p}:1: field 'options': needs at least 1 option, got 0",
    ),
    (
        "options_blank",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": "a", "options": ["x", ""]}),
        "{p}:1: field 'options': option 2 is an empty or whitespace-only string",
    ),
    (
        "answer_int",
        "prompts",
        "a.jsonl",
        _jsonl({"prompt": "a", "answer": 1}),
        "{p}:1: field 'answer': expected a string, got integer",
    ),
    ("empty_jsonl", "prompts", "a.jsonl", "\n \n", "{p}: no records"),
    (
        "parquet_prompt_int",
        "prompts",
        "a.parquet",
        pa.table({"prompt": [1, 2]}),
        "{p}: field 'prompt': column type int64, expected string or list<struct<role: string, content: string>>",
    ),
    (
        "parquet_ranking_double",
        "comparisons",
        "a.parquet",
        pa.table({"prompt": ["p"], "responses": [["a", "b"]], "ranking": [[0.0, 1.0]]}),
        "{p}: field 'ranking': column type list<double>, expected list<int64>",
    ),
    (
        "parquet_user_id_double",
        "prompts",
        "a.parquet",
        pa.table({"prompt": ["p"], "user_id": [1.5]}),
        "{p}: field 'user_id': column type double, expected string or integer",
    ),
    (
        "parquet_null",
        "prompts",
        "a.parquet",
        pa.table({"prompt": ["a", None]}),
        "{p}:2: field 'prompt': null value",
    ),
    (
        "parquet_missing_column",
        "demonstrations",
        "a.parquet",
        pa.table({"prompt": ["a"]}),
        "{p}: field 'response': missing column",
    ),
    (
        "parquet_blank_response",
        "comparisons",
        "a.parquet",
        pa.table({"prompt": ["p"], "responses": [["a", ""]], "ranking": [[1, 0]]}),
        "{p}:1: field 'responses': response 2 is an empty or whitespace-only string",
    ),
    (
        "parquet_no_rows",
        "pretrain",
        "a.parquet",
        pa.table({"text": pa.array([], pa.string())}),
        "{p}: no records",
    ),
    (
        "not_parquet",
        "prompts",
        "a.parquet",
        b"PAR1 this is not parquet",
        "{p}: not a readable Parquet file (...",
    ),
]


def _materialise(tmp_path: Path, name: str, content: object) -> Path:
    """Create the file (or directory) a corpus entry describes; return its path."""
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, pa.Table):
        pq.write_table(content, path)
    return path


def test_corpus_is_large_enough():
    assert len(BAD_FILES) >= 25
    assert len({case[0] for case in BAD_FILES}) == len(BAD_FILES)


@pytest.mark.parametrize(
    ("kind", "name", "content", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_rejected_with_exact_line(tmp_path, kind, name, content, expected):
    path = _materialise(tmp_path, name, content)
    expected = expected.format(p=path)
    report = validate_files(kind, [path])
    assert not report.ok
    first = report.problems[0]
    if expected.endswith("..."):
        assert first.startswith(expected[:-3]) and first.endswith(")"), first
    else:
        assert first == expected
    assert "\n" not in first
    with pytest.raises(DataError) as info:
        read_records(kind, [path])
    assert str(info.value) == first
    assert info.value.lines == report.problem_lines()


GOOD = {
    "demonstrations": [
        {"prompt": "Write a haiku.", "response": "Leaves fall.", "user_id": 3, "task": "generation"},
        {"prompt": "Name a colour.", "response": "Blue."},
    ],
    "comparisons": [
        {"prompt": "Pick one.", "responses": ["x", "y", "z"], "ranking": [2, 0, 0], "user_id": "u1"},
        {"prompt": "Another.", "responses": ["a", "b"], "ranking": [0, 1], "task": "chat"},
    ],
    "prompts": [
        {
            "prompt": "Is it positive?",
            "options": ["positive", "negative"],
            "answer": "positive",
            "user_id": "u9",
        },
        {"prompt": "Tell me a story.", "task": "generation"},
    ],
    "pretrain": [{"text": "Once upon a time."}, {"text": "The end.", "user_id": 1}],
}


@pytest.mark.parametrize("kind", sorted(GOOD))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_good_files_accepted_and_round_trip(tmp_path, kind, suffix):
    path = tmp_path / f"good{suffix}"
    if suffix == ".parquet":
        write_parquet(path, kind, GOOD[kind])
    else:
        write_jsonl(path, GOOD[kind])
    report = validate_files(kind, [path])
    assert report.ok, report.problem_lines()
    assert report.warnings == [] and report.n_records == 2 and report.n_files == 1
    assert read_records(kind, [path]) == GOOD[kind]
    table = read_table(kind, [path])
    assert table.num_rows == 2
    assert table.column_names[0] == ("text" if kind == "pretrain" else "prompt")


def test_unknown_field_is_warned_once_per_file_and_dropped(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "a", "source": "web"}, {"text": "b", "source": "x", "lang": "en"}]
    write_jsonl(path, rows)
    report = validate_files("pretrain", [path])
    assert report.ok
    assert report.warnings == [
        f"{path}:1: field 'source': unknown field (ignored)",
        f"{path}:2: field 'lang': unknown field (ignored)",
    ]
    assert read_records("pretrain", [path]) == [{"text": "a"}, {"text": "b"}]


def test_unknown_parquet_column_is_warned_for_the_file(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a"], "score": [0.5]}), path)
    report = validate_files("pretrain", [path])
    assert report.ok and report.warnings == [f"{path}: field 'score': unknown field (ignored)"]
    assert read_records("pretrain", [path]) == [{"text": "a"}]


def test_null_optional_fields_count_as_absent(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "user_id": pa.array([7, None], pa.int64())}), path)
    assert read_records("prompts", [path]) == [{"prompt": "a", "user_id": 7}, {"prompt": "b"}]


def test_more_than_20_problems_are_truncated(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"prompt": i} for i in range(30)])
    report = validate_files("prompts", [path])
    lines = report.problem_lines()
    assert report.n_problems == 30 and report.n_records == 30
    assert len(lines) == 21
    assert lines[0] == f"{path}:1: field 'prompt': expected a string, got integer"
    assert lines[19].startswith(f"{path}:20: ")
    assert lines[20] == "... and 10 more problems"
    with pytest.raises(DataError) as info:
        read_records("prompts", [path])
    assert info.value.lines == lines


def test_problems_from_several_files_in_order(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.parquet"
    write_jsonl(good, [{"prompt": "a"}])
    pq.write_table(pa.table({"prompt": ["x", None, " "]}), bad)
    report = validate_files("prompts", [good, bad, tmp_path / "gone.json"])
    assert report.problem_lines() == [
        f"{bad}:2: field 'prompt': null value",
        f"{bad}:3: field 'prompt': empty or whitespace-only string",
        f"{tmp_path / 'gone.json'}: file not found",
    ]
    assert report.n_files == 3 and report.n_records == 4


def test_no_records_in_any_file_is_an_error(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("")
    b.write_text("\n")
    report = validate_files("pretrain", [a, b])
    assert report.problem_lines() == [f"no records in any of: {a}, {b}"]
    assert report.warnings == [f"{a}: no records", f"{b}: no records"]
    assert validate_files("pretrain", []).problem_lines() == ["no input files given"]


def test_one_empty_file_among_good_ones_is_only_a_warning(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("")
    write_jsonl(b, [{"text": "hello"}])
    report = validate_files("pretrain", [a, b])
    assert report.ok and report.warnings == [f"{a}: no records"]


def test_unknown_kind_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="unknown data kind 'rankings'"):
        validate_files("rankings", [tmp_path / "x.jsonl"])


def test_records_from_several_files_keep_file_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    write_jsonl(a, [{"prompt": "1"}, {"prompt": "2"}])
    write_parquet(b, "prompts", [{"prompt": "3", "user_id": "u"}])
    assert read_records("prompts", [a, b]) == [
        {"prompt": "1"},
        {"prompt": "2"},
        {"prompt": "3", "user_id": "u"},
    ]


def test_data_modules_import_only_allowed_packages():
    """trainers/data must not import Ray, DeepSpeed or vLLM (docs/design.md, "Layout"); checked on the source of every
    module in the directory (globbed, so a new module is covered without editing this test)."""
    # tokenizers/transformers: the world's BPE tokenizer (tokenizer.py); allowed, unlike the three above.
    allowed = set(sys.stdlib_module_names) | {
        "pyarrow",
        "torch",
        "tokenizers",
        "transformers",
        "trainers",
        "__future__",
    }
    root = Path(__file__).resolve().parents[2] / "trainers" / "data"
    paths = sorted(root.glob("**/*.py"))
    assert {"__init__.py", "validate.py", "world.py", "tokenizer.py"} <= {p.name for p in paths}
    for path in paths:
        name = str(path.relative_to(root))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(tops) <= allowed, (name, tops)


def test_length_problems_name_file_and_row_and_are_capped():
    path = Path("data/demonstrations/train.parquet")
    lines = length_problems([3, 9, 4, 12], path, max_len=8, what="prompt + response")
    assert lines == [
        "data/demonstrations/train.parquet:2: prompt + response is 9 tokens long, more than model.max_len=8",
        "data/demonstrations/train.parquet:4: prompt + response is 12 tokens long, more than model.max_len=8",
    ]
    many = length_problems([99] * 25, path, max_len=8, what="x")
    assert len(many) == 21 and many[-1] == "... and 5 more problems"
