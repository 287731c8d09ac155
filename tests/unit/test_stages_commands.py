"""``rlhf pretrain|sft|rm`` (trainers.stages.cli): argument parsing, and a config error before any work."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import TINY_CONFIG
from trainers.cli import main
from trainers.stages.cli import register


def test_stage_commands_parse_config_overrides_out_and_fresh():
    parser = argparse.ArgumentParser(prog="rlhf")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["rm", "--config", "c.yaml", "rm.lr=1e-4", "model.path=m", "--out", "o", "--fresh"]
    )
    assert (args.stage, args.config, args.overrides, args.out, args.fresh) == (
        "rm",
        "c.yaml",
        ["rm.lr=1e-4", "model.path=m"],
        "o",
        True,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["sft", "--config", "c.yaml"])  # --out is required


def test_stage_cli_config_error_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["pretrain", "--config", str(TINY_CONFIG), "pretrain.lr=-1", "--out", str(out)])
    assert code == 2
    assert (
        capsys.readouterr().err
        == "rlhf: error: config key 'pretrain.lr': -1.0 is out of range (must be > 0)\n"
    )
    assert not out.exists()
