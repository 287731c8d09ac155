"""Session fixtures of the integration tests: one local Ray, a small synthetic world, trained tiny models.

Everything is real: Ray Train workers, DeepSpeed ZeRO-3 over gloo, transformers models, on CPU.
The trained models are session-scoped so later tests (PPO) reuse them:

- ``ray_local``: the one Ray instance of the session (8 logical CPUs on this 2-core machine, so
  small actors can coexist); shut down at the end;
- ``world_dir``: ``trainers.data.world.synthesize`` at :data:`SYNTH_SCALE`;
- ``base_run`` / ``sft_run`` / ``rm_run``: the three stages run by ``trainers.stages`` with the tiny
  preset (``trainers/configs/tiny.yaml`` + :data:`TEST_OVERRIDES`); each is ``StageRun(out, summary,
  cfg)``; ``base_model_dir``, ``sft_model_dir``, ``rm_model_dir`` are their ``model/`` folders;
- ``ppo_reference``: one uninterrupted PPO-ptx run (:data:`PPO_REFERENCE_OVERRIDES`) from that SFT model and
  RM, ``PPORun(out, summary, records, inputs)``: test_ppo.py inspects its outputs, and the fault tests
  (test_ppo_fault_recovery.py, test_ppo_sigkill.py) compare their disturbed runs with its metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG

SYNTH_SCALE = 0.3
"""World size for the tests: ~1,000 pretraining documents, ~900 demonstrations, ~360 comparisons."""
TEST_OVERRIDES: dict[str, list[str]] = {
    "pretrain": ["pretrain.epochs=2"],
    "sft": ["sft.epochs=2"],
    "rm": ["rm.epochs=3", "rm.lr=5e-4"],
}
"""Per-stage overrides on top of tiny.yaml: a few more epochs over the smaller world."""
COMMON_OVERRIDES = ["logging.log_every=1"]
"""Every step in metrics.jsonl (the equivalence and resume tests compare steps one by one)."""
PPO_TEST_OVERRIDES = [
    "ppo.prompts_per_iteration=16",
    "ppo.samples_per_prompt=2",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=4",
    "ppo.ppo_epochs=2",  # 32 rows / 16 x 2 epochs = 4 optimizer steps per iteration
    "ppo.policy_workers=2",
    "ppo.critic_workers=1",
    "ppo.policy_lr=2e-4",
    "ppo.critic_lr=1e-4",
    "ppo.ptx_coef=0.5",
    "ppo.ptx_batch_size=2",
    "rollout.max_new_tokens=32",
    "logging.log_every=1",
]
"""The small PPO-ptx run every PPO integration test builds on (2 policy ranks, 1 critic, 1 engine)."""
ADAPTIVE_KL_OVERRIDES = [
    "ppo.adaptive_kl=true",
    "ppo.kl_coef=0.05",
    "ppo.kl_target=1.0",
    "ppo.kl_horizon=200",
]
"""The adaptive KL controller with a target the tiny run reaches (its state is part of a checkpoint)."""
PPO_REFERENCE_ITERATIONS = 6
PPO_REFERENCE_OVERRIDES = [
    f"ppo.iterations={PPO_REFERENCE_ITERATIONS}",
    *PPO_TEST_OVERRIDES,
    *ADAPTIVE_KL_OVERRIDES,
    "ppo.checkpoint_every=3",
    "ppo.keep_checkpoints=2",
]
"""The shared uninterrupted PPO run (``ppo_reference``): 6 iterations, adaptive KL, ptx on, checkpoints after
iterations 3 and 6.

A run that differs from it only in :data:`METRIC_NEUTRAL_KEYS` logs the same metrics for every iteration
both have: every random choice derives from (seed, iteration), the learning rate is constant, and a
checkpoint save reads the DeepSpeed states without changing them. That is what lets the fault tests
compare a 4-iteration disturbed run with the first 4 rows of this one."""
METRIC_NEUTRAL_KEYS = (
    "ppo.iterations",
    "ppo.checkpoint_every",
    "ppo.keep_checkpoints",
    "ppo.max_engine_restarts",
    "cluster.ray_address",
    "cluster.role_resources",
    "cluster.placement_timeout_s",
    "cluster.autoscaling",
    "cluster.autoscaler_config",
)
"""Settings a run may change against :data:`PPO_REFERENCE_OVERRIDES` and still be compared with its metrics."""
STAGE_CACHE = os.environ.get("RLHF_TEST_STAGE_CACHE")
"""Developer convenience (CI leaves it unset): a directory where the session fixtures keep the world and
the trained base/SFT/RM runs between pytest sessions, so iterating on one PPO test skips ~2.5 min of
stage training. A finished run (its summary.json exists) is reused as it is."""


@dataclass
class StageRun:
    """One finished stage run: its output directory, summary and the config it ran with."""

    out: Path
    summary: dict
    cfg: object

    @property
    def model_dir(self) -> Path:
        return self.out / "model"


def stage_overrides(
    stage: str, world_dir: Path, model_path: Path | None = None, extra: list[str] = ()
) -> list[str]:
    """The overrides a test run of ``stage`` uses (the fixtures' and any variant of them)."""
    out = [f"data.dir={world_dir}", *COMMON_OVERRIDES, *TEST_OVERRIDES[stage]]
    if model_path is not None:
        out.append(f"model.path={model_path}")
    return out + list(extra)


def load_stage_config(stage: str, world_dir: Path, model_path: Path | None = None, extra: list[str] = ()):
    """tiny.yaml + the test overrides, as a validated Config."""
    from trainers.config import load_config

    return load_config(TINY_CONFIG, stage_overrides(stage, world_dir, model_path, extra))


def run_stage_for_test(
    stage: str,
    out: Path,
    world_dir: Path,
    model_path: Path | None = None,
    extra: list[str] = (),
    max_failures: int | None = None,
    fresh: bool = False,
) -> StageRun:
    """Run ``stage`` (pretrain/sft/rm) in this process, on the session's Ray.

    ``max_failures`` overrides ``<stage>.max_failures`` (Ray Train's FailureConfig); ``fresh`` goes to
    ``run_<stage>``. Faults are injected through the environment (``RLHF_FAULT_*``, cluster/faults.py),
    which the stage forwards to its Ray Train workers: set them with ``monkeypatch.setenv``.
    """
    from trainers.stages import run_pretrain, run_rm, run_sft

    cfg = load_stage_config(stage, world_dir, model_path, extra)
    cached = STAGE_CACHE and Path(out).is_relative_to(Path(STAGE_CACHE))
    if cached and (out / "summary.json").is_file() and not fresh and max_failures is None:
        return StageRun(out=out, summary=json.loads((out / "summary.json").read_text()), cfg=cfg)
    if max_failures is not None:
        getattr(cfg, stage).max_failures = max_failures
    runner = {"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm}[stage]
    summary = runner(cfg, out, fresh=fresh)
    return StageRun(out=out, summary=summary, cfg=cfg)


@dataclass
class PPORun:
    """One finished PPO run: output directory, summary, metrics.jsonl rows, and its data/model overrides."""

    out: Path
    summary: dict
    records: list[dict]
    inputs: list[str]
    """``data.dir``/``model.path``/``reward.path`` of the run (a variant of it passes them on)."""


def ppo_inputs(world_dir: Path, sft_model_dir: Path, rm_model_dir: Path) -> list[str]:
    """The data and model overrides of a PPO test run."""
    return [f"data.dir={world_dir}", f"model.path={sft_model_dir}", f"reward.path={rm_model_dir}"]


def reference_variant(extra: list[str]) -> list[str]:
    """:data:`PPO_REFERENCE_OVERRIDES` then ``extra``, which may only set :data:`METRIC_NEUTRAL_KEYS`, so the
    variant's metrics can be compared with the reference run's row by row."""
    for item in extra:
        assert item.split("=", 1)[0] in METRIC_NEUTRAL_KEYS, item
    return [*PPO_REFERENCE_OVERRIDES, *extra]


def load_ppo_config(inputs: list[str], overrides: list[str]):
    """tiny.yaml + the data/model inputs + ``overrides``, as a validated Config."""
    from trainers.config import load_config

    return load_config(TINY_CONFIG, [*inputs, *overrides])


@pytest.fixture(scope="session")
def ray_local():
    """The session's local Ray (8 logical CPUs, 1 torch thread per actor)."""
    import ray

    from cluster.connect import connect

    connect(None, num_cpus=8, torch_threads=1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """The synthetic world at SYNTH_SCALE (seed 0): data kinds, splits, tokenizer."""
    from trainers.data.world import synthesize

    if STAGE_CACHE:
        out = Path(STAGE_CACHE) / "world"
        if not (out / ".complete").is_file():
            synthesize(out, seed=0, scale=SYNTH_SCALE)
            (out / ".complete").write_text("")
        return out
    out = tmp_path_factory.mktemp("world")
    synthesize(out, seed=0, scale=SYNTH_SCALE)
    return out


@pytest.fixture(scope="session")
def stage_root(tmp_path_factory) -> Path:
    if STAGE_CACHE:
        return Path(STAGE_CACHE) / "stages"
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="session")
def base_run(ray_local, world_dir, stage_root) -> StageRun:
    """Stage 0: the tiny base model pretrained from scratch by 2 Ray Train workers (ZeRO-3)."""
    return run_stage_for_test("pretrain", stage_root / "base", world_dir)


@pytest.fixture(scope="session")
def sft_run(base_run, world_dir, stage_root) -> StageRun:
    """Stage 1: SFT of the base model (2 workers, ZeRO-3)."""
    return run_stage_for_test("sft", stage_root / "sft", world_dir, base_run.model_dir)


@pytest.fixture(scope="session")
def rm_run(sft_run, world_dir, stage_root) -> StageRun:
    """Stage 2: the reward model from the SFT model (2 workers, ZeRO-3), normalised."""
    return run_stage_for_test("rm", stage_root / "rm", world_dir, sft_run.model_dir)


@pytest.fixture(scope="session")
def base_model_dir(base_run) -> Path:
    return base_run.model_dir


@pytest.fixture(scope="session")
def sft_model_dir(sft_run) -> Path:
    return sft_run.model_dir


@pytest.fixture(scope="session")
def rm_model_dir(rm_run) -> Path:
    return rm_run.model_dir


@pytest.fixture(scope="session")
def ppo_reference(ray_local, world_dir, sft_model_dir, rm_model_dir, tmp_path_factory) -> PPORun:
    """The uninterrupted PPO run of :data:`PPO_REFERENCE_OVERRIDES`, in this process on the session's Ray.
    Tests only read it (a test that continues it works on a copy)."""
    from trainers.ppo.driver import run_ppo
    from trainers.runs.metrics import read_metrics

    inputs = ppo_inputs(world_dir, sft_model_dir, rm_model_dir)
    out = tmp_path_factory.mktemp("ppo_reference") / "run"
    summary = run_ppo(load_ppo_config(inputs, PPO_REFERENCE_OVERRIDES), out)
    return PPORun(out, summary, read_metrics(out / "metrics.jsonl"), inputs)
