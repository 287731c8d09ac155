"""``rlhf ppo``: PPO-ptx from an SFT model against a reward model, into an output directory.

    rlhf ppo --config trainers/configs/tiny.yaml --out runs/ppo \\
        data.dir=/tmp/world model.path=runs/sft/model reward.path=runs/rm/model ppo.ptx_coef=1.0

Reads ``data.dir`` (prompts/train, and pretrain/train when ``ppo.ptx_coef > 0``), ``model.path`` (the SFT
model: policy and reference start there) and ``reward.path`` (the RM: reward model and critic start
there). Running the same command again resumes from the newest complete checkpoint in
``OUT/checkpoints``; ``--fresh`` starts over. A user error (config, data, model directories, resources
that can never be met) prints one line and exits 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os

from cluster.resources import ClusterResources, check_feasible, use_gpu
from trainers.config import add_config_args, load_config


def check_local_resources(cfg) -> None:
    """UserError now, rather than after Ray's start-up, for a request a local Ray could never meet.

    ``rlhf ppo`` without ``cluster.ray_address`` (and outside ``ray job submit``, which sets
    RAY_ADDRESS) starts a one-node Ray with ``cluster.num_cpus`` CPUs (else the machine's) and the
    visible GPUs; the roles' bundles are checked against that node. A cluster is checked once joined
    (:func:`trainers.ppo.roles.check_resources`). The machine's CPU count can only overstate what Ray
    detects, so this never refuses a request that Ray would meet.
    """
    import torch  # here, not at the top: a config error is reported before torch loads (seconds)

    from trainers.ppo.setup import ppo_bundles  # imports torch

    if cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    node = {
        "CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1),
        "GPU": float(torch.cuda.device_count()),
    }
    local = ClusterResources(total=node, node_shapes=[node])
    gpu = use_gpu(cfg.cluster.device, local)
    check_feasible(ppo_bundles(cfg, gpu), local, colocated=cfg.cluster.placement == "colocated")


def _run(args: argparse.Namespace) -> int:
    """Load the config, check resources a local Ray would have, run PPO, print the summary."""
    # Before the driver's imports (torch, Ray; seconds): a config error is reported at once.
    cfg = load_config(args.config, args.overrides)
    check_local_resources(cfg)
    from trainers.ppo.driver import run_ppo

    summary = run_ppo(cfg, args.out, fresh=args.fresh)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ppo`` to the top-level ``rlhf`` CLI."""
    text = "stage 3: PPO-ptx of the SFT model (model.path) against the reward model (reward.path)"
    p = sub.add_parser("ppo", help=text, description=text)
    add_config_args(p)
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (model/, metrics, checkpoints)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="ignore and delete earlier checkpoints/metrics in DIR"
    )
    p.set_defaults(func=_run)
