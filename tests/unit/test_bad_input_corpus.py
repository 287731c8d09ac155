"""A corpus of bad inputs run through the real ``rlhf`` entry point, one subprocess per case.

Every case must give what a user error promises (STYLE, docs/design.md): exit code 2, exactly one
non-empty line on stderr, no traceback, nothing on stdout, and nothing written: an ``--out`` that did
not exist is still absent afterwards, and one that existed (a directory holding a sentinel file, or a
plain file) is byte-identical to before. Three families, each with at least eight cases: data files,
configs, and command-line arguments. One case is the documented exception to "one line": a data file
with several bad records gets the validator's one ``PATH:RECORD: ...`` line per problem (at most 20),
and every line must then name the file.

The inputs are small local fixtures built once per module: a synthetic world at scale 0.05, model
directories that pass the directory checks (``config.json``, a ``.safetensors`` file and the world's
tokenizer; nothing here gets as far as loading weights), and hand-written bad files. The cases run
in a small thread pool (each subprocess pays ~1-3 s of imports), before any test asserts on them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_CONFIG, subprocess_env

WORKERS = 4
"""Subprocesses at once: most of a case is Python start-up and imports, which overlap well."""
LONG_TEXT = " ".join(f"word{i}" for i in range(600))
"""Far more tokens than any model.max_len a case uses."""


@dataclass(frozen=True)
class Case:
    """One bad input: the ``rlhf`` arguments, the text its error line must hold, what ``--out`` is."""

    id: str
    family: str
    """``data``, ``config`` or ``cli``."""
    argv: tuple[str, ...]
    """Arguments after ``rlhf``; ``{name}`` is replaced by a fixture path (see :func:`build_inputs`)."""
    expect: str
    """A substring of the one stderr line (proves the case failed for its own reason)."""
    out: str | None = None
    """``new`` (``{out}`` must not exist afterwards), ``dir`` (an existing directory with a sentinel
    file), ``file`` (an existing file; ``{out}/x`` is then an output path under a file) or None (the
    command writes nothing, or only under a path that can never exist, such as /proc)."""
    lines: int = 1
    """stderr lines: 1, except for a data file with several bad records, where the validator prints one
    ``PATH:RECORD: ...`` line per problem (each must then name the file, the case's last argument)."""


def _case(id_, family, argv, expect, out=None, lines=1):
    return Case(id_, family, tuple(argv.split()), expect, out, lines)


STAGE = "--config {tiny} data.dir={world} model.path={model}"
PPO = "--config {tiny} data.dir={world} model.path={model} reward.path={model}"

CASES: list[Case] = [
    # ---------------------------------------------------------------- data files
    _case("bad-json-line", "data", "data validate --kind prompts {bad_json}", ":2: not valid JSON"),
    _case(
        "wrong-field-type", "data", "data validate --kind demonstrations {wrong_type}", "expected a string"
    ),
    _case("missing-field", "data", "data validate --kind demonstrations {missing_field}", "'response'"),
    _case("empty-file", "data", "data validate --kind prompts {empty}", "no records"),
    _case(
        "several-bad-rows", "data", "data validate --kind prompts {many_bad}", ":1: field 'prompt'", lines=3
    ),
    _case("k1-ranking", "data", "data validate --kind comparisons {k1}", "'responses'"),
    _case("duplicate-ranks", "data", "data validate --kind comparisons {dup_ranks}", "no two distinct ranks"),
    _case("json-array", "data", "data validate --kind prompts {json_array}", "JSON array"),
    _case("csv-extension", "data", "data validate --kind prompts {csv}", "unsupported file extension"),
    _case("not-parquet", "data", "data validate --kind prompts {fake_parquet}", "not a readable Parquet"),
    _case("unknown-kind", "data", "data validate --kind labels {empty}", "invalid choice: 'labels'"),
    _case(
        "messages-unknown-role",
        "data",
        "data validate --kind demonstrations {unknown_role}",
        ":1: field 'messages': message 2 has unknown role 'tool'",
    ),
    _case(
        "messages-no-final-assistant",
        "data",
        "data validate --kind demonstrations {no_assistant}",
        ":1: field 'messages': ends with a user turn; it must end with an assistant turn",
    ),
    _case(
        "chosen-equals-rejected",
        "data",
        "data validate --kind comparisons {same_pair}",
        ":2: field 'rejected': same text as 'chosen'",
    ),
    _case(
        "datasets-dir-without-data",
        "data",
        "data validate --kind prompts {hf_empty}",
        "hf_empty: a datasets save_to_disk directory without data files",
    ),
    _case(
        "prepare-bad-input",
        "data",
        "data prepare --kind prompts {bad_json} --out {out}",
        "not valid JSON",
        out="new",
    ),
    _case(
        "sft-missing-split",
        "data",
        "sft --config {tiny} data.dir={no_valid} model.path={model} --out {out}",
        "file not found",
        out="new",
    ),
    _case(
        "sft-empty-train",
        "data",
        "sft --config {tiny} data.dir={empty_train} model.path={model} --out {out}",
        "train.parquet: no records",
        out="new",
    ),
    _case(
        "sft-no-chat-template",
        "data",
        "sft --config {tiny} data.dir={world} model.path={model_no_template} --out {out}",
        "has no chat template; give one with model.chat_template=",
        out="new",
    ),
    _case(
        "sft-chat-template-file-missing",
        "config",
        "sft --config {tiny} data.dir={world} model.path={model} model.chat_template={nowhere}/t.jinja --out {out}",
        "model.chat_template=",
        out="new",
    ),
    _case(
        "sft-too-long",
        "data",
        "sft --config {tiny} data.dir={long_demo} data.overlong=error model.path={model} --out {out}",
        "more than model.max_len=256",
        out="new",
    ),
    _case(
        "ppo-prompt-too-long",
        "data",
        "ppo --config {tiny} data.dir={long_prompt} data.overlong=error model.path={model} reward.path={model} --out {out}",
        "more than model.max_len=256 minus rollout.max_new_tokens",
        out="dir",
    ),
    _case(
        "rm-k1-ranking",
        "data",
        "rm --config {tiny} data.dir={k1_world} model.path={model} --out {out}",
        "'responses'",
        out="new",
    ),
    _case(
        "sft-too-few-examples",
        "data",
        f"sft {STAGE} sft.micro_batch_size=512 sft.global_batch_size=1024 --out {{out}}",
        "fewer than sft.global_batch_size=1024",
        out="new",
    ),
    _case(
        "eval-prompts-missing-field",
        "data",
        "eval --policy {model} --baseline {model} --prompts {wrong_kind_prompts}",
        "'prompt'",
    ),
    # ---------------------------------------------------------------- configs
    _case("unknown-key", "config", "config show ppo.kl_cof=0.1", "did you mean 'ppo.kl_coef'"),
    _case("wrong-type", "config", f"sft {STAGE} sft.epochs=two --out {{out}}", "expected int", out="new"),
    _case("out-of-range", "config", f"ppo {PPO} ppo.kl_coef=-1 --out {{out}}", "out of range", out="new"),
    _case("bad-choice", "config", f"sft {STAGE} model.dtype=fp8 --out {{out}}", "is not one of", out="dir"),
    _case("yaml-syntax", "config", "sft --config {bad_yaml} --out {out}", "is not valid YAML", out="new"),
    _case(
        "config-missing", "config", "rm --config {nowhere}/c.yaml --out {out}", "does not exist", out="new"
    ),
    _case("config-not-utf8", "config", "config show --config {latin1_yaml}", "cannot be read"),
    _case("config-is-directory", "config", "config show --config {world}", "is a directory"),
    _case("non-finite-value", "config", f"sft {STAGE} sft.lr=.inf --out {{out}}", "finite number", out="new"),
    _case("config-not-mapping", "config", "config show --config {list_yaml}", "must hold a mapping"),
    _case("unknown-section", "config", "config show --config {unknown_section}", "unknown config section"),
    _case("override-no-equals", "config", "config show ppo.kl_coef", "not of the form section.key=value"),
    _case(
        "stage-batch-not-divisible",
        "config",
        f"sft {STAGE} sft.global_batch_size=48 --out {{out}}",
        "is not a multiple of",
        out="new",
    ),
    _case(
        "ppo-batch-not-divisible",
        "config",
        f"ppo {PPO} ppo.mini_batch_size=12 --out {{out}}",
        "is not a multiple of",
        out="new",
    ),
    _case(
        "ppo-cpus-impossible",
        "config",
        f"ppo {PPO} cluster.device=cpu cluster.num_cpus=2 --out {{out}}",
        "needs 6 CPU",
        out="new",
    ),
    _case(
        "ppo-gpus-impossible",
        "config",
        f"ppo {PPO} cluster.device=cuda rollout.num_engines=4 rollout.tensor_parallel_size=2 --out {{out}}",
        "GPU",
        out="new",
    ),
    _case(
        "top-p-not-1",
        "config",
        f"ppo {PPO} rollout.top_p=0.9 --out {{out}}",
        "rollout.top_p must be 1.0",
        out="new",
    ),
    _case(
        "data-dir-unset",
        "config",
        "sft --config {tiny} model.path={model} --out {out}",
        "data.dir",
        out="new",
    ),
    # ---------------------------------------------------------------- command-line arguments
    _case("unknown-command", "cli", "train --out {out}", "invalid choice: 'train'", out="new"),
    _case("missing-out", "cli", f"sft {STAGE}", "the following arguments are required: --out"),
    _case("bad-arg-type", "cli", "data synth --scale big --out {out}", "invalid float value", out="new"),
    _case(
        "unknown-model-path",
        "cli",
        "sft --config {tiny} data.dir={world} model.path={nowhere}/m --out {out}",
        "does not exist",
        out="new",
    ),
    _case(
        "model-without-weights",
        "cli",
        "sft --config {tiny} data.dir={world} model.path={model_no_weights} --out {out}",
        "no .safetensors",
        out="new",
    ),
    _case(
        "model-bin-only",
        "cli",
        "ppo --config {tiny} data.dir={world} model.path={model_bin} reward.path={model} --out {out}",
        "no .safetensors",
        out="new",
    ),
    _case(
        "tokenizer-missing",
        "cli",
        f"sft {STAGE} model.tokenizer={{nowhere}}/tok --out {{out}}",
        "no tokenizer.json",
        out="new",
    ),
    _case(
        "model-without-config",
        "cli",
        "rm --config {tiny} data.dir={world} model.path={world} --out {out}",
        "no config.json",
        out="new",
    ),
    _case("out-under-file", "cli", f"sft {STAGE} --out {{out}}/run", "not writable", out="file"),
    _case("out-is-file", "cli", f"sft {STAGE} --out {{out}}", "is not a directory", out="file"),
    _case("out-in-proc", "cli", f"ppo {PPO} --out /proc/rlhf-out", "not writable"),
    _case("synth-out-under-file", "cli", "data synth --scale 0.05 --out {out}/w", "not writable", out="file"),
    _case("synth-out-is-file", "cli", "data synth --scale 0.05 --out {out}", "not a directory", out="file"),
    _case("synth-scale-zero", "cli", "data synth --scale 0 --out {out}", "--scale", out="new"),
    _case(
        "prepare-bad-frac",
        "cli",
        "data prepare --kind prompts {good_prompts} --valid-frac 1.5 --out {out}",
        "--valid-frac",
        out="new",
    ),
    _case(
        "eval-missing-prompts",
        "cli",
        "eval --policy {model} --baseline {model} --prompts {nowhere}/p.jsonl",
        "does not exist",
    ),
    _case(
        "eval-bad-judge",
        "cli",
        "eval --policy {model} --baseline {model} --prompts {good_prompts} --judge human",
        "unknown judge 'human'",
    ),
    _case(
        "eval-missing-policy",
        "cli",
        "eval --policy {nowhere}/p --pretrain-file {good_text}",
        "does not exist",
    ),
    _case(
        "eval-out-under-file",
        "cli",
        "eval --policy {model} --pretrain-file {good_text} --out {out}/r.json",
        "is not a directory",
        out="file",
    ),
    _case("eval-baseline-without-prompts", "cli", "eval --policy {model} --baseline {model}", "needs both"),
    _case("eval-n-zero", "cli", "eval --policy {model} --pretrain-file {good_text} --n 0", "--n must be"),
]
# Issue 15's estimators and reward sources: PPO config errors, all found before anything starts.
ISSUE_15 = (
    ("unknown-estimator", "ppo.advantage=ppo2", "'ppo.advantage': 'ppo2' is not one of 'gae', 'grpo'"),
    ("group-one-sample", "ppo.advantage=grpo", "ppo.advantage=grpo compares a prompt's samples"),
    ("function-no-import", "reward.function=no_such_module_xyz:f", "importing no_such_module_xyz failed"),
    ("function-not-callable", "reward.function=trainers.data.gold:QUANTUM", "QUANTUM is a float, not a"),
    ("url-unreachable", "reward.url=http://127.0.0.1:9/ reward.url_timeout_s=2", "is unreachable"),
    ("weights-unset-source", 'reward.weights={{"url":0.5}}', "names 'url' but reward.url is not set"),
)
CASES += [
    _case(id_, "config", f"ppo {PPO} {args} --out {{out}}", expect, "new") for id_, args, expect in ISSUE_15
]
CASES.append(
    _case(
        "gae-without-reward-model",
        "config",
        f"ppo {STAGE} reward.function=trainers.data.gold:reward --out {{out}}",
        "ppo.advantage=gae trains a critic that starts from the reward model",
        out="dir",
    )
)


# --------------------------------------------------------------------------------------------------
# Fixtures: the inputs every case draws on
# --------------------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fake_model(path: Path, tokenizer: Path, weights: str | None = "model.safetensors") -> Path:
    """A directory that passes the model-directory checks (nothing in the corpus loads its weights)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        (path / weights).write_bytes(b"not loaded by any case")
    for f in tokenizer.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _world_variant(world: Path, dest: Path, kind: str, edit) -> Path:
    """A copy of ``world`` whose ``kind/train.parquet`` rows went through ``edit(rows) -> rows``."""
    shutil.copytree(world, dest)
    path = dest / kind / "train.parquet"
    table = pq.read_table(path)
    pq.write_table(type(table).from_pylist(edit(table.to_pylist()), schema=table.schema), path)
    return dest


def _set_first(field: str, value):
    def edit(rows):
        rows[0][field] = value
        return rows

    return edit


def build_inputs(root: Path) -> dict[str, Path]:
    """Every fixture path a case may name, built under ``root``."""
    from trainers.data.world import synthesize

    world = root / "world"
    synthesize(world, seed=0, scale=0.05)
    tok = world / "tokenizer"
    files = root / "files"
    files.mkdir()
    p = {"tiny": TINY_CONFIG, "world": world, "nowhere": root / "nowhere"}
    p["model"] = _fake_model(root / "model", tok)
    p["model_bin"] = _fake_model(root / "model_bin", tok, weights="pytorch_model.bin")
    p["model_no_weights"] = _fake_model(root / "model_no_weights", tok, weights=None)
    p["model_no_template"] = _fake_model(root / "model_no_template", tok)  # a base model's tokenizer
    (p["model_no_template"] / "chat_template.jinja").unlink()
    p["bad_json"] = files / "bad.jsonl"
    p["bad_json"].write_text('{"prompt": "fine"}\n{"prompt": "cut off\n')
    p["wrong_type"] = _jsonl(files / "wrong_type.jsonl", [{"prompt": 3, "response": "r"}])
    p["missing_field"] = _jsonl(files / "missing.jsonl", [{"prompt": "p"}])
    p["empty"] = files / "empty.jsonl"
    p["empty"].write_text("")
    p["many_bad"] = _jsonl(files / "many_bad.jsonl", [{"prompt": 1}, {"prompt": "fine"}, {"prompt": " "}, {}])
    p["k1"] = _jsonl(files / "k1.jsonl", [{"prompt": "p", "responses": ["only"], "ranking": [0]}])
    p["dup_ranks"] = _jsonl(
        files / "dup.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]}]
    )
    p["unknown_role"] = _jsonl(
        files / "roles.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}],
    )
    p["no_assistant"] = _jsonl(
        files / "no_assistant.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]
    )
    p["same_pair"] = _jsonl(
        files / "pairs.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
        ],
    )
    p["hf_empty"] = files / "hf_empty"  # what save_to_disk leaves when its shards are gone
    p["hf_empty"].mkdir()
    (p["hf_empty"] / "dataset_info.json").write_text("{}")
    (p["hf_empty"] / "state.json").write_text(json.dumps({"_data_files": [], "_split": None}))
    p["json_array"] = files / "array.json"
    p["json_array"].write_text('[{"prompt": "p"}]\n')
    p["csv"] = files / "prompts.csv"
    p["csv"].write_text("prompt\nhello\n")
    p["fake_parquet"] = files / "prompts.parquet"
    p["fake_parquet"].write_text("this is not parquet\n")
    p["good_prompts"] = _jsonl(files / "prompts.jsonl", [{"prompt": f"say {i}"} for i in range(4)])
    p["wrong_kind_prompts"] = _jsonl(files / "texts.jsonl", [{"text": "not a prompt"}])
    p["good_text"] = _jsonl(files / "text.jsonl", [{"text": "a little text"}])
    p["bad_yaml"] = files / "bad.yaml"
    p["bad_yaml"].write_text("ppo:\n  kl_coef: [0.1\n")
    p["latin1_yaml"] = files / "latin1.yaml"
    p["latin1_yaml"].write_bytes("model:\n  preset: caf\u00e9\n".encode("latin-1"))
    p["list_yaml"] = files / "list.yaml"
    p["list_yaml"].write_text("- ppo\n")
    p["unknown_section"] = files / "section.yaml"
    p["unknown_section"].write_text("trainer:\n  lr: 0.1\n")
    p["no_valid"] = root / "no_valid"
    (p["no_valid"] / "demonstrations").mkdir(parents=True)
    shutil.copy(world / "demonstrations" / "train.parquet", p["no_valid"] / "demonstrations")
    p["long_demo"] = _world_variant(
        world, root / "long_demo", "demonstrations", _set_first("response", LONG_TEXT)
    )
    p["empty_train"] = _world_variant(world, root / "empty_train", "demonstrations", lambda rows: [])
    p["long_prompt"] = _world_variant(world, root / "long_prompt", "prompts", _set_first("prompt", LONG_TEXT))

    def k1(rows):
        rows[0]["responses"], rows[0]["ranking"] = rows[0]["responses"][:1], [0]
        return rows

    p["k1_world"] = _world_variant(world, root / "k1_world", "comparisons", k1)
    return p


# --------------------------------------------------------------------------------------------------
# Running the corpus
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    out_path: Path | None
    before: dict[str, bytes] | None
    """Files under a pre-existing ``--out`` (or the file itself) before the run, by relative path."""


def snapshot(path: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of a file or of every file under a directory."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _prepare_out(case: Case, case_dir: Path) -> Path | None:
    """The case's ``{out}``: absent (``new``), a directory with a sentinel (``dir``), or a file."""
    out = case_dir / "out"
    if case.out == "dir":
        out.mkdir()
        (out / "sentinel.txt").write_text("written before the run; must survive it\n")
    elif case.out == "file":
        out.write_text("an existing file; must survive the run\n")
    return out if case.out else None


def run_case(case: Case, inputs: dict[str, Path], case_dir: Path) -> Outcome:
    """Run ``rlhf`` with the case's arguments in a subprocess (no Ray address in its environment)."""
    case_dir.mkdir(parents=True)
    out = _prepare_out(case, case_dir)
    names = {k: str(v) for k, v in inputs.items()} | {"out": str(case_dir / "out")}
    argv = [a.format(**names) for a in case.argv]
    before = snapshot(out) if out is not None and out.exists() else None
    env = subprocess_env(own_ray=True)
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.cli", *argv],
        capture_output=True,
        text=True,
        cwd=case_dir,
        env=env,
        timeout=180,
    )
    return Outcome(case, argv, proc.returncode, proc.stdout, proc.stderr, out, before)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every case's outcome, run in a small thread pool."""
    root = tmp_path_factory.mktemp("corpus")
    inputs = build_inputs(root)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {c.id: pool.submit(run_case, c, inputs, root / "cases" / c.id) for c in CASES}
        return {cid: f.result() for cid, f in futures.items()}


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_corpus_covers_every_family():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 30
    for family in ("data", "config", "cli"):
        assert sum(c.family == family for c in CASES) >= 8, family


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: Case, outcomes):
    o = outcomes[case.id]
    shown = f"rlhf {' '.join(o.argv)}\nexit {o.returncode}\nstdout: {o.stdout!r}\nstderr: {o.stderr}"
    assert o.returncode == 2, shown
    assert "Traceback" not in o.stderr, shown
    lines = o.stderr.splitlines()
    assert len(lines) == case.lines and all(line.strip() for line in lines), shown
    assert case.expect in lines[0], shown
    if case.lines > 1:
        assert all(line.startswith(f"{o.argv[-1]}:") for line in lines), shown
    assert o.stdout == "", shown
    if case.out == "new":
        assert not o.out_path.exists(), f"{o.out_path} was created\n{shown}"
    elif case.out in ("dir", "file"):
        assert snapshot(o.out_path) == o.before, f"{o.out_path} changed\n{shown}"
