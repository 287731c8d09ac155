"""The shipped configs in trainers/configs/: each loads and validates, and each real-size config fits the
cluster shape its header names.

A real-size config starts with a line ``# cluster: N node(s) x G GPU(s)``. Its PPO roles, turned into
resource bundles exactly as ``rlhf ppo`` does (:func:`trainers.ppo.setup.ppo_bundles`), must pass
:func:`cluster.resources.check_feasible` on that cluster and use every GPU of it (dedicated: the sum of
the roles' GPUs; colocated: one shared GPU per rank index, i.e. the largest role); the SFT and RM stages
(one GPU per Ray Train worker) must use every GPU too; and every optimizer step must split into whole
micro-batches per rank. A role worker added to a config that no longer fits fails here, not on a cluster.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.resources import ClusterResources, check_feasible, colocated_bundles, sum_bundles
from tests.conftest import REPO, subprocess_env
from trainers.config import Config, load_config
from trainers.errors import UserError
from trainers.ppo.setup import ppo_bundles
from trainers.runtime.zero import grad_accum_steps

CONFIGS = sorted((REPO / "trainers" / "configs").glob("*.yaml"))
CPU_PRESETS = {"tiny.yaml"}
"""Configs for this machine's CPU: no cluster shape to fit."""
REAL = [p for p in CONFIGS if p.name not in CPU_PRESETS]
SHAPE = re.compile(r"^# cluster: (\d+) nodes? x (\d+) GPUs?\s*$", re.M)
NODE_CPUS = 1e6
"""CPUs of a node in the shape check: GPUs are what these configs are sized by."""


def declared_shape(path: Path) -> tuple[int, int]:
    """``(nodes, gpus_per_node)`` from the config's ``# cluster: N node x G GPU`` header line."""
    match = SHAPE.search(path.read_text())
    assert match, f"{path.name}: no '# cluster: N node x G GPU' header line"
    return int(match.group(1)), int(match.group(2))


def shape_problems(cfg: Config, nodes: int, gpus_per_node: int) -> list[str]:
    """Why ``cfg`` does not fit a cluster of ``nodes`` x ``gpus_per_node`` GPUs or leaves GPUs idle;
    [] when its PPO roles and its SFT/RM workers use exactly that cluster."""
    total = nodes * gpus_per_node
    node = {"GPU": float(gpus_per_node), "CPU": NODE_CPUS}
    cluster = ClusterResources(
        total={"GPU": float(total), "CPU": nodes * NODE_CPUS}, node_shapes=[node] * nodes
    )
    colocated = cfg.cluster.placement == "colocated"
    bundles = ppo_bundles(cfg, gpu=True)
    problems = []
    try:
        check_feasible(bundles, cluster, colocated=colocated)
    except UserError as err:
        problems.append(f"ppo: {err}")
    together = colocated_bundles(bundles) if colocated else [b for role in bundles.values() for b in role]
    used = sum_bundles(together)["GPU"]
    if used < total:
        problems.append(f"ppo roles ({cfg.cluster.placement}) use {used:g} of {total} GPUs")
    for stage in ("sft", "rm"):
        workers = getattr(cfg, stage).num_workers
        if workers != total:
            problems.append(f"{stage}.num_workers={workers} on a cluster of {total} GPUs")
    return problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.rollout.max_new_tokens < cfg.model.max_len


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_config_fits_the_cluster_it_names(path):
    nodes, gpus = declared_shape(path)
    cfg = load_config(path, ["reward.path=rm/model"])  # PPO's RM, given on the command line
    assert cfg.cluster.device == "cuda"
    assert shape_problems(cfg, nodes, gpus) == []


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_config_steps_split_into_whole_micro_batches(path):
    cfg = load_config(path)
    for stage in (cfg.sft, cfg.rm):
        assert grad_accum_steps(stage.global_batch_size, stage.micro_batch_size, stage.num_workers) >= 1
    p = cfg.ppo
    rollout = p.prompts_per_iteration * p.samples_per_prompt
    assert rollout % p.mini_batch_size == 0
    assert rollout % p.policy_workers == 0
    for workers in (p.policy_workers, p.critic_workers):
        assert grad_accum_steps(p.mini_batch_size, p.micro_batch_size, workers) >= 1


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_config_leaves_the_users_paths_unset(path):
    cfg = load_config(path)
    assert (cfg.model.path, cfg.reward.path, cfg.data.dir) == (None, None, None)
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert "rlhf pipeline --config trainers/configs/" + path.name in path.read_text()


def test_the_configs_the_readme_names_exist():
    names = {p.name for p in REAL}
    assert {"qwen2.5-0.5b-1gpu.yaml", "llama3-8b-8gpu.yaml"} <= names
    readme = (REPO / "README.md").read_text()
    assert [n for n in names if f"trainers/configs/{n}" not in readme] == []


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("qwen2.5-0.5b-1gpu.yaml", ["ppo.critic_workers=2"], "needs 2 GPU"),
        ("qwen2.5-0.5b-1gpu.yaml", ["sft.num_workers=2", "sft.global_batch_size=64"], "sft.num_workers=2"),
        ("llama3-8b-8gpu.yaml", ["rollout.num_engines=3"], "needs 9 GPU"),
        ("llama3-8b-8gpu.yaml", ["rollout.tensor_parallel_size=2"], "needs 10 GPU"),
        ("llama3-8b-8gpu.yaml", ["rollout.num_engines=1"], "use 7 of 8 GPUs"),
    ],
)
def test_the_shape_check_catches_a_role_that_no_longer_fits(name, overrides, expected):
    path = REPO / "trainers" / "configs" / name
    problems = shape_problems(load_config(path, ["reward.path=rm/model", *overrides]), *declared_shape(path))
    assert any(expected in line for line in problems), problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_rlhf_config_show_prints_each_config(path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.cli", "config", "show", "--config", str(path.relative_to(REPO))],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    cfg = load_config(path)
    assert shown["cluster"]["placement"] == cfg.cluster.placement
    assert shown["ppo"]["policy_workers"] == cfg.ppo.policy_workers
