"""The `rlhf` command as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, TINY_CONFIG, subprocess_env


def rlhf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-m", "trainers.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_help_lists_working_commands():
    out = rlhf("--help")
    assert out.returncode == 0
    assert "config" in out.stdout and "data" in out.stdout


def test_config_show_override():
    out = rlhf("config", "show", "--config", str(TINY_CONFIG), "ppo.kl_coef=0.1")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["ppo"]["kl_coef"] == 0.1
    ppo_block = out.stdout.split("\nppo:\n", 1)[1].split("\n\n")[0]
    assert "  kl_coef: 0.1\n" in ppo_block


def test_config_show_typo_exits_2_one_line():
    out = rlhf("config", "show", "--config", str(TINY_CONFIG), "ppo.kl_cof=0.1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "kl_cof" in lines[0] and "kl_coef" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_missing_config_file_exits_2(tmp_path):
    out = rlhf("config", "show", "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "does not exist" in out.stderr


def test_usage_error_exits_2():
    out = rlhf("no-such-command")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_console_script_installed():
    exe = Path(sys.executable).parent / "rlhf"
    assert exe.exists(), "the `rlhf` console script is not installed in this environment"
    out = subprocess.run(
        [str(exe), "config", "show", "ppo.kl_coef=0.3"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["ppo"]["kl_coef"] == 0.3


def test_parameter_offload_below_zero_3_exits_2_one_line():
    out = rlhf("config", "show", "--config", str(TINY_CONFIG), "ppo.offload_params=true", "ppo.zero_stage=2")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo.offload_params" in lines[0] and "zero_stage=3" in lines[0], out.stderr
