"""`rlhf data validate|prepare|synth`: exit codes, exact stderr lines, printed counts.

Driven through the real top-level CLI, ``trainers.cli.main`` (its UserError handling is what users
get: problem lines verbatim, a plain message with the ``rlhf: error:`` prefix, exit 2), plus one
subprocess run of the module entry.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from tests.conftest import REPO
from trainers.cli import main
from trainers.data import write_jsonl


def test_validate_ok_prints_one_line_and_warnings_on_stderr(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"prompt": "x", "colour": "red"}, {"prompt": "y"}])
    write_jsonl(b, [{"prompt": "z"}])
    assert main(["data", "validate", "--kind", "prompts", str(a), str(b)]) == 0
    out, err = capsys.readouterr()
    assert out == "OK: 3 records in 2 files\n"
    assert err == f"{a}:1: field 'colour': extra field (kept)\n"


def test_validate_bad_exits_2_with_exactly_the_problem_lines(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    write_jsonl(
        path,
        [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}] + [{"prompt": i} for i in range(25)],
    )
    assert main(["data", "validate", "--kind", "comparisons", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert (
        lines[0]
        == f"{path}:1: field 'ranking': no two distinct ranks ([0, 0]); a ranking must prefer at least one response"
    )
    assert lines[1] == f"{path}:2: field 'prompt': expected a string, got integer"
    assert lines[2] == f"{path}:2: field 'responses': missing"
    assert len(lines) == 21 and lines[-1] == "... and 56 more problems"  # 1 + 25 * 3 = 76 problems
    assert "Traceback" not in err


def test_top_level_cli_prints_a_single_problem_verbatim(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": None}])
    assert main(["data", "validate", "--kind", "prompts", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}:1: field 'prompt': null value\n"


def test_prepare_prints_counts_and_refuses_existing_output(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_jsonl(
        src, [{"prompt": f"prompt {i}", "user_id": i % 5} for i in range(20)] + [{"prompt": "PROMPT  3"}]
    )
    argv = ["data", "prepare", "--kind", "prompts", str(src), "--out", str(out), "--max-per-user", "3"]
    assert main(argv) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert printed["read"] == "21" and printed["duplicates_dropped"] == "1" and printed["capped"] == "5"
    assert int(printed["train"]) + int(printed["valid"]) + int(printed["test"]) == 15
    assert (out / "valid.parquet").exists()

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"rlhf: error: --out {out} already holds train.parquet, valid.parquet, test.parquet; "
        "pass --overwrite to replace them\n"
    )
    assert main(argv + ["--overwrite", "--seed", "3"]) == 0


def test_prepare_invalid_input_exits_2_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "a"}\nnot json\n')
    assert main(["data", "prepare", "--kind", "prompts", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{src}:2: not valid JSON (") and err.count("\n") == 1
    assert not out.exists()


def test_prepare_help_documents_the_prefix_default(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in help_text and "0 disables" in help_text


def test_synth_calls_the_world_and_prints_its_summary(tmp_path, capsys, monkeypatch):
    calls = []

    def synthesize(out_dir, *, seed, scale):
        calls.append((out_dir, seed, scale))
        return {"prompts": 120, "out": out_dir}

    world = types.ModuleType("trainers.data.world")
    world.synthesize = synthesize
    monkeypatch.setitem(sys.modules, "trainers.data.world", world)
    assert main(["data", "synth", "--out", str(tmp_path), "--seed", "4", "--scale", "0.5"]) == 0
    assert calls == [(str(tmp_path), 4, 0.5)]
    assert capsys.readouterr().out == f"prompts: 120\nout: {tmp_path}\n"


def test_missing_subcommand_or_bad_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "rlhf data: error: the following arguments are required: {validate,prepare,synth}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["data", "validate", "--kind", "rankings", "x.jsonl"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "rlhf data validate: error: argument --kind: invalid choice: 'rankings'"
    )


def test_module_entry_point_in_a_subprocess(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_jsonl(good, [{"prompt": "hello"}])
    write_jsonl(bad, [{"prompt": "   "}])
    cmd = [sys.executable, "-m", "trainers.cli", "data", "validate", "--kind", "prompts"]
    ok = subprocess.run(cmd + [str(good)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "OK: 1 record in 1 file\n", "")
    fail = subprocess.run(cmd + [str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (fail.returncode, fail.stdout) == (2, "")
    assert fail.stderr == f"{bad}:1: field 'prompt': empty or whitespace-only string\n"
