"""``rlhf pretrain | sft | rm``: run a Ray Train stage into an output directory.

    rlhf pretrain --config trainers/configs/tiny.yaml data.dir=/tmp/world --out runs/base
    rlhf sft --config trainers/configs/tiny.yaml data.dir=/tmp/world model.path=runs/base/model --out runs/sft
    rlhf rm --config trainers/configs/tiny.yaml data.dir=/tmp/world model.path=runs/sft/model --out runs/rm

Running the same command again resumes from the newest checkpoint in ``OUT/checkpoints``;
``--fresh`` starts over. A user error (bad config, bad data row, missing model) prints its line(s)
and exits 2 before any worker starts, leaving ``--out`` untouched.
"""

from __future__ import annotations

import argparse

from trainers.config import add_config_args, load_config

_HELP = {
    "pretrain": "stage 0: pretrain a base model (from model.preset, or continue model.path)",
    "sft": "stage 1: supervised fine-tuning on demonstrations (from model.path)",
    "rm": "stage 2: reward model on ranked comparisons (from model.path, the SFT model)",
}


def _run(args: argparse.Namespace) -> int:
    """Load the config, run the stage, print the summary."""
    # Before the stages' imports (torch, seconds): a config error is reported at once.
    cfg = load_config(args.config, args.overrides)
    from trainers.stages import run_pretrain, run_rm, run_sft

    runner = {"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm}[args.stage]
    summary = runner(cfg, args.out, fresh=args.fresh)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain``, ``sft`` and ``rm`` to a subparsers object."""
    for stage, text in _HELP.items():
        p = sub.add_parser(stage, help=text, description=text)
        add_config_args(p)
        p.add_argument(
            "--out", required=True, metavar="DIR", help="output directory (model/, metrics, checkpoints)"
        )
        p.add_argument(
            "--fresh", action="store_true", help="ignore and delete earlier checkpoints/metrics in DIR"
        )
        p.set_defaults(func=_run, stage=stage)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the stage commands to the top-level ``rlhf`` CLI."""
    add_stage_commands(subparsers)
