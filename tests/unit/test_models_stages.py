"""Pure helpers of the Ray Train stages: step planning, data order, sharding, length checks, pair counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainers.config import load_config
from trainers.data.sharding import rank_share
from trainers.data.validate import length_problems
from trainers.errors import ConfigError
from trainers.stages.batching import epoch_order, plan_steps, step_indices
from trainers.stages.checkpoints import check_resumable
from trainers.stages.plan import make_plan
from trainers.stages.rm import pair_counts
from trainers.stages.sft import SPEC as SFT_SPEC

TINY = Path(__file__).resolve().parents[2] / "trainers" / "configs" / "tiny.yaml"


def test_plan_steps_drops_the_partial_batch_and_max_steps_only_stops_early():
    assert plan_steps(100, 32, epochs=2, max_steps=-1) == (3, 6, 6)
    assert plan_steps(100, 32, epochs=2, max_steps=4) == (3, 6, 4)  # the schedule still spans 6 steps
    assert plan_steps(100, 32, epochs=2, max_steps=50) == (3, 6, 6)
    assert plan_steps(10, 32, epochs=3, max_steps=-1) == (0, 0, 0)


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch():
    a = epoch_order(50, seed=0, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=0, epoch=0)
    assert a != epoch_order(50, seed=0, epoch=1)
    assert a != epoch_order(50, seed=1, epoch=0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_union_over_ranks_is_the_global_batch_whatever_the_world_size(world):
    order = epoch_order(64, seed=3, epoch=0)
    batch = step_indices(order, index_in_epoch=1, global_batch=16)
    assert batch == order[16:32]
    shares = [rank_share(batch, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == batch
    assert all(len(s) == 16 // world for s in shares)


def test_length_problems_name_file_and_row_and_are_capped():
    path = Path("data/demonstrations/train.parquet")
    lines = length_problems([3, 9, 4, 12], path, max_len=8, what="prompt + response")
    assert lines == [
        "data/demonstrations/train.parquet:2: prompt + response is 9 tokens long, more than model.max_len=8",
        "data/demonstrations/train.parquet:4: prompt + response is 12 tokens long, more than model.max_len=8",
    ]
    many = length_problems([99] * 25, path, max_len=8, what="x")
    assert len(many) == 21 and many[-1] == "... and 5 more problems"


def test_check_resumable_rejects_a_different_run_shape():
    cfg = load_config(TINY, ["model.tokenizer=/tok", "sft.micro_batch_size=8"])
    plan = make_plan(SFT_SPEC, cfg, Path("/o"), (3, 6, 6), "cpu", "fp32")
    shape = {"world_size": 2, "global_batch_size": 32, "micro_batch_size": 8, "zero_stage": 3}
    assert plan.run_shape() == shape
    check_resumable(None, plan)
    check_resumable(dict(shape, step=4), plan)
    with pytest.raises(ConfigError, match="world_size=1, this run has 2"):
        check_resumable(dict(shape, world_size=1), plan)


def test_pair_counts_skip_ties_and_absent_responses():
    ranks = torch.tensor([[0, 1, 2, -1], [0, 0, 1, 1], [1, 1, -1, -1]])
    # row 0: 3 present, all distinct -> 3 pairs; row 1: two tied groups of 2 -> 4 pairs; row 2: tie -> 0
    assert pair_counts(ranks).tolist() == [3, 4, 0]


def test_stage_commands_parse_config_overrides_out_and_fresh():
    import argparse

    from trainers.stages.cli import register

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
    from trainers.cli import main

    out = tmp_path / "out"
    code = main(["pretrain", "--config", str(TINY), "pretrain.lr=-1", "--out", str(out)])
    assert code == 2
    assert (
        capsys.readouterr().err
        == "rlhf: error: config key 'pretrain.lr': -1.0 is out of range (must be > 0)\n"
    )
    assert not out.exists()
