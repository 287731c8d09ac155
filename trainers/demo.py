"""``rlhf demo``: the whole InstructGPT pipeline on the embedded synthetic world, on one local Ray.

    rlhf demo                                   # runs/demo, trainers/configs/tiny.yaml
    rlhf demo --out /tmp/demo ppo.iterations=10 # dotted overrides as in every command
    rlhf demo --out /tmp/demo --fresh           # start over
    python -m trainers.cli demo ...             # the same without the console script (make demo)

The demo is ``rlhf pipeline`` (:mod:`trainers.pipeline`) on the synthetic world plus pretraining: its
stage loop, resume, Ray stages and RM-judged evaluation are the pipeline's; the demo adds the world,
stage 0, the gold labeler (the world has one) and the held-out cluster. Seven stages, each in its own
sub-directory of ``--out``::

    world/     synthetic world + tokenizer + held-out cluster     (trainers.data.world.synthesize)
    pretrain/  stage 0: tiny base model from scratch (model.preset); also the ptx distribution
    sft/       stage 1: SFT of the base model on demonstrations
    rm/        stage 2: reward model from the SFT model on K-way rankings
    ppo/       stage 3: PPO-ptx of the SFT model against the RM
    eval/      gold-labeler win rate of PPO-ptx over SFT on held-out test prompts, gold scores,
               RM-judged win rate, pretraining loss (alignment tax), held-out cluster accuracy
    report/    summary.json, report.png, report.txt (trainers.evaluation.report.write_report)

Decisions:

- **One Ray instance**: Ray is started by the first Ray stage (``cluster.connect.connect`` is
  idempotent within a process, so every later stage and PPO join the same instance) and shut down
  after PPO, before the evaluation, which runs in this process with transformers.
- **Resume**: a stage whose ``summary.json`` exists is skipped (its earlier result line is printed);
  a stage that was interrupted resumes from its own checkpoints. ``--fresh`` deletes the stage
  directories first. ``OUT/config.yaml`` records the resolved config; rerunning with other values
  reruns from the first stage they affect (``ppo.*``, ``rollout.*``, ``reward.*``: PPO-ptx onwards;
  ``rm.*``: the RM onwards; ...; ``cluster.*`` and ``logging.*`` change no result), so tuning PPO
  does not repeat pretraining. Whenever a stage runs again, every later stage's old output is removed.
- **The demo owns the paths**: ``data.dir``, ``model.path``, ``reward.path`` and ``model.tokenizer``
  are set per stage; giving them as overrides is a user error (values in a config file are replaced).
- Every user error (config, unwritable ``--out``, changed config on resume) exits 2 with one line
  before any work starts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path

from trainers import pipeline
from trainers.evaluation.demo_report import (
    MODELS,
    assemble_summary,
    closing_lines,
    write_demo_report,
)
from trainers.pipeline import loop
from trainers.pipeline.loop import Layout, Runner, summary_path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
"""The CPU preset the demo runs by default (shipped as package data)."""
DEFAULT_OUT = "runs/demo"
RAY_STAGES = ("pretrain", "sft", "rm", "ppo")
OWNED_KEYS = ("data.dir", "model.path", "model.tokenizer", "reward.path")
"""Config keys the demo sets for each stage itself."""
FIRST_AFFECTED = {
    "data": "world",
    "model": "pretrain",
    "pretrain": "pretrain",
    "sft": "sft",
    "rm": "rm",
    "rollout": "ppo",
    "reward": "ppo",
    "ppo": "ppo",
}
"""The first stage whose result a config section changes (sections not listed change none)."""
DEMO = Layout(
    command="demo",
    stages=(("world", "synthetic world"), ("pretrain", "pretrain (stage 0, base model)"))
    + pipeline.pipeline_layout(ptx=True).stages,
    ray_stages=RAY_STAGES,
    first_affected=FIRST_AFFECTED,
    owned_keys=OWNED_KEYS,
    owned_hint="use `rlhf pipeline` (or `rlhf sft`, `rlhf rm`...) to run the stages on other data or models",
)
"""The demo's stage loop: the world and stage 0, then the pipeline's stages."""
STAGES = DEMO.stages
"""(directory / name, title) of every stage, in order."""
config_differences = DEMO.config_differences
first_changed_stage = DEMO.first_changed_stage

# --------------------------------------------------------------------------------------------------
# Paths and configuration
# --------------------------------------------------------------------------------------------------


def model_dirs(out: Path) -> dict[str, Path]:
    """The model directory of each evaluated model (``MODELS``)."""
    return {
        "base": out / "pretrain" / "model",
        "sft": out / "sft" / "model",
        "ppo_ptx": out / "ppo" / "model",
    }


def set_stage_paths(cfg, out: Path, stage: str):
    """Give ``cfg`` (a loaded :class:`~trainers.config.Config`, changed in place and returned) the
    demo's paths for ``stage``: the world as data and tokenizer, the model it starts from and, for
    PPO, the reward model. Set on the dataclasses, not as override text, so any path works."""
    start = {"sft": "pretrain", "rm": "sft", "ppo": "sft"}.get(stage)
    cfg.data.dir = str(out / "world")
    cfg.model.tokenizer = None  # the world's tokenizer, saved with every model after stage 0
    cfg.model.path = str(out / start / "model") if start else None
    cfg.reward.path = str(out / "rm" / "model") if stage == "ppo" else None
    return cfg.validate()


def stage_configs(config: str | Path, overrides, out: Path) -> dict:
    """``{"base": Config, stage: Config, ...}``: the user's config, and per Ray stage with the demo's
    paths; every one is loaded and validated here, so a bad value fails before any work."""
    from trainers.config import load_config

    loop.check_overrides(overrides, DEMO)
    configs = {"base": set_stage_paths(load_config(config, list(overrides)), out, "world")}
    for stage in RAY_STAGES:
        configs[stage] = set_stage_paths(load_config(config, list(overrides)), out, stage)
    return configs


# --------------------------------------------------------------------------------------------------
# Stage runners: (configs, out) -> summary dict, written to OUT/<stage>/summary.json
# --------------------------------------------------------------------------------------------------


def run_world(configs: dict, out: Path) -> dict:
    """Synthesize the world into ``OUT/world`` (deterministic for ``data.seed``/``data.synth_scale``)."""
    from trainers.data.world import synthesize
    from trainers.files import atomic_write_json

    start = time.time()
    data = configs["base"].data
    world = synthesize(out / "world", seed=data.seed, scale=data.synth_scale)
    summary = {
        "world/rows": world["rows"],
        "world/seed": world["seed"],
        "world/scale": world["scale"],
        "world/vocab_size": world["vocab_size"],
        "world/wall_time_s": round(time.time() - start, 2),
    }
    atomic_write_json(summary_path(out, "world"), summary)
    return summary


def evaluate_responses(cfg, out: Path) -> dict:
    """SFT and PPO-ptx sample one response per held-out test prompt (same seed); the gold labeler
    and the RM compare them (the RM as in :func:`trainers.pipeline.loop.sample_and_judge`); gold scores and
    criteria (closing rate...) of both."""
    from trainers.evaluation import generation, judges

    prompts = generation.read_prompts(out / "world" / "prompts" / "test.parquet")
    dirs = model_dirs(out)
    print(f"evaluation: sampling {len(prompts)} held-out test prompts with SFT and PPO-ptx", flush=True)
    sampling = loop.eval_sampling(cfg)
    responses, rm = loop.sample_and_judge(
        prompts, {"sft": dirs["sft"], "ppo_ptx": dirs["ppo_ptx"]}, out / "rm" / "model", sampling
    )
    gold = judges.win_rate(prompts, responses["ppo_ptx"], responses["sft"], judges.GoldJudge())
    return {
        "eval/win_rate_gold": gold,
        "eval/win_rate_rm": rm,
        "eval/gold_scores": {name: judges.gold_scores(prompts, responses[name]) for name in responses},
        "eval/sampling": sampling,
        "eval/examples": loop.examples(prompts, responses),
    }


def evaluate_models(cfg, out: Path) -> dict:
    """Pretraining loss on ``pretrain/valid`` (the alignment tax) and held-out cluster accuracy (rank
    classification) of the base, SFT and PPO-ptx models."""
    from trainers.data.templates import HELDOUT_CLUSTERS
    from trainers.evaluation import heldout, lm_loss

    world, dirs = out / "world", model_dirs(out)
    texts = lm_loss.read_texts(world / "pretrain" / "valid.parquet")
    loss = {name: lm_loss.pretrain_loss(dirs[name], texts, max_len=cfg.model.max_len) for name in MODELS}
    cluster = HELDOUT_CLUSTERS[0]
    heldout = {name: heldout.heldout_accuracy(dirs[name], cluster, world) for name in MODELS}
    accuracy = {name: heldout[name]["accuracy"] for name in MODELS}
    return {
        "eval/pretrain_loss": loss,
        "eval/heldout_accuracy": accuracy | {"cluster": cluster, "chance": heldout["base"]["chance"]},
    }


def run_evaluation(configs: dict, out: Path) -> dict:
    """The evaluation stage: ``OUT/eval/summary.json`` (see :func:`evaluate_responses`,
    :func:`evaluate_models`)."""
    from trainers.files import atomic_write_json

    start = time.time()
    cfg = configs["base"]
    summary = evaluate_responses(cfg, out) | evaluate_models(cfg, out)
    summary["eval/wall_time_s"] = round(time.time() - start, 2)
    atomic_write_json(summary_path(out, "eval"), summary)
    return summary


def default_runners() -> dict[str, Runner]:
    """Stage name -> runner, for every stage but the report (which always runs: it is cheap)."""
    return {
        "world": run_world,
        **{stage: loop.ray_stage(stage) for stage in RAY_STAGES},
        "eval": run_evaluation,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def prepare(config: str | Path | None, overrides, out_dir: str | Path, fresh: bool):
    """Every user error, before any work: config (all stages), output directory, the recorded config.
    Returns ``(out, configs, changed)`` with ``changed`` as
    :func:`trainers.pipeline.loop.changed_since_last_run` answers."""
    from trainers.runs.outdir import check_output_dir

    out = check_output_dir(out_dir)
    configs = stage_configs(config or DEFAULT_CONFIG, overrides, out)
    changed = ([], None) if fresh else loop.changed_since_last_run(out, configs["base"], DEMO)
    return out, configs, changed


def run_demo(
    config: str | Path | None,
    overrides,
    out_dir: str | Path,
    fresh: bool = False,
    runners: Mapping[str, Runner] | None = None,
) -> dict:
    """The whole demo into ``out_dir``; returns the report summary (also in ``OUT/report/summary.json``).

    ``runners`` replaces stage runners by name (tests); by default :func:`default_runners`.
    """
    from trainers.runs.metrics import read_metrics

    start = time.time()
    out, configs, changed = prepare(config, overrides, out_dir, fresh)
    loop.start_output(out, DEMO, configs["base"], fresh, changed)
    runners = {**default_runners(), **(runners or {})}
    summaries, timings, skipped = loop.run_stages(DEMO, configs, out, runners)
    loop.report_heading(DEMO)
    clock = time.time()
    summary = assemble_summary(summaries, read_metrics(out / "ppo" / "metrics.jsonl"), timings)
    summary |= {"stages_skipped": skipped, "config": str(Path(config or DEFAULT_CONFIG))}
    win_rates = {
        "PPO-ptx vs SFT (gold)": summaries["eval"]["eval/win_rate_gold"],
        "PPO-ptx vs SFT (RM)": summaries["eval"]["eval/win_rate_rm"],
    }
    path = write_demo_report(out, summary, win_rates)
    written = loop.finish_report(path, summary, start, clock)
    print(closing_lines(summary, out), flush=True)
    return written


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_HELP = "the whole pipeline on the embedded synthetic world: pretrain, SFT, RM, PPO-ptx, evaluation, report"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--config``, ``--fresh`` and dotted overrides."""
    p.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default {DEFAULT_OUT})"
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML config (default: trainers/configs/tiny.yaml, the CPU preset)"
    )
    p.add_argument("--fresh", action="store_true", help="delete earlier stage outputs in DIR and start over")
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. ppo.iterations=10"
    )


def _run(args: argparse.Namespace) -> int:
    """Run the demo; exit code 0 whether or not the win-rate target was met (the report says)."""
    run_demo(args.config, args.overrides, args.out, fresh=args.fresh)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the top-level ``rlhf`` CLI."""
    p = sub.add_parser("demo", help=_HELP, description=_HELP)
    add_demo_arguments(p)
    p.set_defaults(func=_run)
