"""`rlhf pretrain|sft|rm` as a subprocess: user errors exit 2 with their lines before any worker starts.

No Ray is needed: every case fails in validation, and the output directory must not be created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.integration


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m trainers.stages.cli ARGS`` from the repository root (``env``: its whole environment)."""
    return subprocess.run(
        [sys.executable, "-m", "trainers.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture
def bad_world(world_dir, tmp_path):
    """A copy of the world whose pretrain/train.parquet has an empty text in row 3 and a null one in row 5."""
    copy = tmp_path / "world"
    shutil.copytree(world_dir, copy)
    path = copy / "pretrain" / "train.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[2]["text"] = ""
    rows[4]["text"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    return copy


def test_bad_data_row_exits_2_with_the_validation_lines_and_writes_nothing(bad_world, tmp_path):
    out = tmp_path / "runs" / "base"
    result = run_cli("pretrain", "--config", str(TINY_CONFIG), f"data.dir={bad_world}", "--out", str(out))
    assert result.returncode == 2, result.stderr
    path = bad_world / "pretrain" / "train.parquet"
    assert result.stderr.strip().splitlines() == [  # the lines `rlhf data validate` prints for the file
        f"{path}:3: field 'text': empty or whitespace-only string",
        f"{path}:5: field 'text': null value",
    ]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["pretrain.global_batch_size=30"], "pretrain.global_batch_size=30 is not a multiple"),
        (["pretrain.learning_rate=0.1"], "unknown config key 'pretrain.learning_rate'"),
        (["model.preset=huge"], "unknown model preset 'huge'"),
    ],
)
def test_bad_config_exits_2_before_anything_runs(world_dir, tmp_path, overrides, message):
    out = tmp_path / "out"
    result = run_cli(
        "pretrain", "--config", str(TINY_CONFIG), f"data.dir={world_dir}", *overrides, "--out", str(out)
    )
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_sft_without_a_safetensors_model_exits_2(world_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    result = run_cli(
        "sft", "--config", str(TINY_CONFIG), f"data.dir={world_dir}", f"model.path={model}", "--out", str(out)
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"rlhf: error: model.path='{model}' holds no .safetensors weights (only safetensors are loaded)"
    )
    assert not out.exists()


@pytest.mark.slow
def test_unreachable_ray_address_exits_2_before_writing_and_hides_the_password(world_dir, tmp_path):
    """Connecting comes before the output directory is touched; Ray Client's own warning and log line are
    silenced so the error stays one line; the URL's password never reaches the terminal. Ray Client tries
    3 times, waiting 5, 10 and 20 s; the test starts it at 1 s (``RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S``,
    read by ray/util/client/worker.py), the same failure in 7 s."""
    out = tmp_path / "out"
    result = run_cli(
        "pretrain",
        "--config",
        str(TINY_CONFIG),
        f"data.dir={world_dir}",
        "cluster.ray_address=ray://someone:hunter2hunter2@127.0.0.1:1",
        "--out",
        str(out),
        env=dict(os.environ, RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S="1"),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to Ray at 'ray://someone:<redacted>@127.0.0.1:1'" in lines[0]
    assert "hunter2hunter2" not in result.stderr + result.stdout
    assert not out.exists()
