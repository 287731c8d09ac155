"""No secret reaches what ray-rlhf prints or writes.

A secret here is: the value of an environment variable whose name looks like a credential (Ray's
``RAY_AUTH_TOKEN``, ``WANDB_API_KEY``, ``HF_TOKEN``...), the contents of Ray's token file
(``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), the value of any config key that looks like one,
and the password part of a ``scheme://user:password@host`` address (``cluster.ray_address``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TINY_CONFIG, subprocess_env
from trainers.config import config_from_dict, dump_yaml, load_config, to_dict
from trainers.redact import REDACTED, is_secret_key, known_secrets, redact, redact_text
from trainers.runs.outdir import prepare_output

MARKERS = {
    "RAY_AUTH_TOKEN": "marker-ray-token-5f1c9e",
    "WANDB_API_KEY": "marker-wandb-key-77ab20",
    "HF_TOKEN": "marker-hf-token-c03d11",
}
FILE_TOKEN = "marker-token-file-e4a2b8"
URL_PASSWORD = "marker-url-password-9d3f"
ADDRESS = f"ray://alice:{URL_PASSWORD}@head.example:10001"


def test_secret_key_names():
    for name in (
        "RAY_AUTH_TOKEN",
        "WANDB_API_KEY",
        "HF_TOKEN",
        "aws_secret_access_key",
        "db_password",
        "apikey",
    ):
        assert is_secret_key(name), name
    for name in (
        "max_new_tokens",
        "tokenizer",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        "tokens_per_s",
        "kl_coef",
    ):
        assert not is_secret_key(name), name


def test_redact_replaces_secret_keys_url_passwords_and_known_values():
    raw = {
        "cluster": {"ray_address": ADDRESS, "num_cpus": 8},
        "logging": {"api_key": "abc", "wandb_project": "rlhf", "empty_token": None},
        "rollout": {"max_new_tokens": 48},
        "notes": [f"token is {FILE_TOKEN}", 3],
    }
    clean = redact(raw, secrets=[FILE_TOKEN])
    assert clean == {
        "cluster": {"ray_address": f"ray://alice:{REDACTED}@head.example:10001", "num_cpus": 8},
        "logging": {"api_key": REDACTED, "wandb_project": "rlhf", "empty_token": None},
        "rollout": {"max_new_tokens": 48},
        "notes": [f"token is {REDACTED}", 3],
    }
    assert raw["cluster"]["ray_address"] == ADDRESS  # a copy: the caller's mapping is untouched
    assert redact_text("ray://head:10001 and auto", secrets=[]) == "ray://head:10001 and auto"


def test_known_secrets_come_from_secret_variables_and_the_ray_token_file(tmp_path):
    token_file = tmp_path / "auth_token"
    token_file.write_text(FILE_TOKEN + "\n")
    environ = dict(MARKERS, RAY_AUTH_TOKEN_PATH=str(token_file), PATH="/usr/bin", SHORT_TOKEN="1")
    assert sorted(known_secrets(environ)) == sorted([*MARKERS.values(), FILE_TOKEN])


def test_config_snapshot_holds_no_secret(tmp_path, monkeypatch):
    """prepare_output writes OUT/config.yaml: with secrets in the environment and in the config."""
    token_file = tmp_path / "auth_token"
    token_file.write_text(FILE_TOKEN)
    for name, value in MARKERS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    cfg = load_config(TINY_CONFIG, [f"cluster.ray_address={ADDRESS}", f"data.dir={tmp_path / 'world'}"])
    out = tmp_path / "out"
    prepare_output(out, dump_yaml(cfg), fresh=False)
    assert_no_marker(out, "")
    snapshot = yaml.safe_load((out / "config.yaml").read_text())
    assert snapshot["cluster"]["ray_address"] == f"ray://alice:{REDACTED}@head.example:10001"
    # Everything else is the resolved config as it was, and still loads as one.
    expected = to_dict(cfg)
    expected["cluster"]["ray_address"] = snapshot["cluster"]["ray_address"]
    assert to_dict(config_from_dict(snapshot)) == expected


def assert_no_marker(out: Path, printed: str) -> None:
    """No marker in ``printed`` nor in any file under ``out`` (read as bytes: binary files too)."""
    markers = [*MARKERS.values(), FILE_TOKEN, URL_PASSWORD]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert files, f"nothing was written under {out}"
    for marker in markers:
        assert marker not in printed, marker
        for f in files:
            assert marker.encode() not in f.read_bytes(), f"{marker} in {f}"


def test_commands_print_and_write_no_secret(tmp_path):
    """Real `rlhf` commands that write output directories or print the config, with secrets around."""
    token_file = tmp_path / "auth_token"
    token_file.write_text(FILE_TOKEN)
    env = subprocess_env(RAY_AUTH_TOKEN_PATH=str(token_file), **MARKERS)
    out = tmp_path / "out"
    commands = [
        ["data", "synth", "--scale", "0.05", "--out", str(out / "world")],
        ["data", "prepare", "--kind", "prompts", str(out / "world" / "prompts" / "train.parquet")]
        + ["--out", str(out / "prompts")],
        ["config", "show", "--config", str(TINY_CONFIG), f"cluster.ray_address={ADDRESS}"],
        ["config", "show", "--doc", f"cluster.ray_address={ADDRESS}"],
    ]
    printed = ""
    for argv in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "trainers.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        printed += proc.stdout + proc.stderr
    assert f"ray://alice:{REDACTED}@head.example:10001" in printed  # the address is shown, its password not
    assert_no_marker(out, printed)
