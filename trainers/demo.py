"""``rlhf demo``: the whole InstructGPT pipeline on the embedded synthetic world, on one local Ray.

    rlhf demo                                   # runs/demo, trainers/configs/tiny.yaml
    rlhf demo --out /tmp/demo ppo.iterations=10 # dotted overrides as in every command
    rlhf demo --out /tmp/demo --fresh           # start over
    python -m trainers.cli demo ...             # the same without the console script (make demo)

Seven stages, each in its own sub-directory of ``--out``::

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
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from trainers.errors import ConfigError
from trainers.evaluation.demo_report import (
    MODELS,
    assemble_summary,
    closing_lines,
    result_line,
    stage_seconds,
    update_json,
    write_demo_report,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
"""The CPU preset the demo runs by default (shipped as package data)."""
DEFAULT_OUT = "runs/demo"
STAGES: tuple[tuple[str, str], ...] = (
    ("world", "synthetic world"),
    ("pretrain", "pretrain (stage 0, base model)"),
    ("sft", "SFT"),
    ("rm", "reward model"),
    ("ppo", "PPO-ptx"),
    ("eval", "evaluation"),
    ("report", "report"),
)
"""(directory / name, title) of every stage, in order."""
RAY_STAGES = ("pretrain", "sft", "rm", "ppo")
OWNED_KEYS = ("data.dir", "model.path", "model.tokenizer", "reward.path")
"""Config keys the demo sets for each stage itself."""
RESULT_NEUTRAL_SECTIONS = ("cluster", "logging")
"""Sections whose values do not change results: they may differ when resuming."""
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
EVAL_BATCH_SIZE = 32
# --------------------------------------------------------------------------------------------------
# Paths and configuration
# --------------------------------------------------------------------------------------------------


def summary_path(out: Path, stage: str) -> Path:
    """``OUT/<stage>/summary.json``: written last by every stage, so its presence means done."""
    return out / stage / "summary.json"


def model_dirs(out: Path) -> dict[str, Path]:
    """The model directory of each evaluated model (``MODELS``)."""
    return {
        "base": out / "pretrain" / "model",
        "sft": out / "sft" / "model",
        "ppo_ptx": out / "ppo" / "model",
    }


def check_overrides(overrides: Sequence[str]) -> None:
    """UserError if an override sets a key the demo sets itself (:data:`OWNED_KEYS`)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in OWNED_KEYS:
            raise ConfigError(
                f"override '{key}' is set by the demo for each stage; use `rlhf data synth`/`rlhf sft`... "
                "to run stages on other data or models"
            )


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


def stage_configs(config: str | Path, overrides: Sequence[str], out: Path) -> dict:
    """``{"base": Config, stage: Config, ...}``: the user's config, and per Ray stage with the demo's
    paths; every one is loaded and validated here, so a bad value fails before any work."""
    from trainers.config import load_config

    check_overrides(overrides)
    configs = {"base": set_stage_paths(load_config(config, list(overrides)), out, "world")}
    for stage in RAY_STAGES:
        configs[stage] = set_stage_paths(load_config(config, list(overrides)), out, stage)
    return configs


def config_differences(old: Mapping, new: Mapping) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, except the demo's own keys
    and the sections that do not change results."""
    diffs = []
    for section in sorted(set(old) | set(new)):
        if section in RESULT_NEUTRAL_SECTIONS:
            continue
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            dotted = f"{section}.{key}"
            if dotted not in OWNED_KEYS and a.get(key) != b.get(key):
                diffs.append(dotted)
    return diffs


def first_changed_stage(diffs: Sequence[str]) -> str | None:
    """The earliest stage (in :data:`STAGES` order) that a list of changed dotted keys affects."""
    order = [name for name, _ in STAGES]
    affected = [FIRST_AFFECTED[key.split(".")[0]] for key in diffs if key.split(".")[0] in FIRST_AFFECTED]
    return min(affected, key=order.index, default=None)


def changed_since_last_run(out: Path, cfg) -> tuple[list[str], str | None]:
    """``(changed keys, first stage to rerun)`` against ``OUT/config.yaml`` (none if there is none)."""
    import yaml

    from trainers.config import to_dict

    saved = out / "config.yaml"
    if not saved.is_file():
        return [], None
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"'{saved}' is not valid YAML; pass --fresh to start over") from None
    diffs = config_differences(old, to_dict(cfg))
    return diffs, first_changed_stage(diffs)


def rerun_from(out: Path, stage: str, diffs: Sequence[str]) -> None:
    """Remove the outputs of ``stage`` and every later one (the config changed under them)."""
    names = [name for name, _ in STAGES]
    shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    print(f"demo: {shown} changed since the last run in {out}: rerunning from {stage}", flush=True)
    for name in names[names.index(stage) :]:
        shutil.rmtree(out / name, ignore_errors=True)


def clear_outputs(out: Path) -> None:
    """``--fresh``: remove the stage directories and the recorded config (nothing else in OUT)."""
    for stage, _ in STAGES:
        shutil.rmtree(out / stage, ignore_errors=True)
    (out / "config.yaml").unlink(missing_ok=True)


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


def _ray_stage(stage: str) -> Callable[[dict, Path], dict]:
    """Runner of a Ray stage: join (or start, the first time) the demo's Ray, then run the stage."""

    def run(configs: dict, out: Path) -> dict:
        from cluster.connect import connect
        from trainers.ppo.driver import run_ppo
        from trainers.stages import run_pretrain, run_rm, run_sft

        cfg = configs[stage]
        connect(
            cfg.cluster.ray_address, num_cpus=cfg.cluster.num_cpus, torch_threads=cfg.cluster.torch_threads
        )
        runner = {"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm, "ppo": run_ppo}[stage]
        return runner(cfg, out / stage)

    return run


def eval_sampling(cfg) -> dict:
    """Evaluation decoding: the rollout's length and temperature, the world's seed for both models."""
    return {
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "seed": cfg.data.seed,
    }


def evaluate_responses(cfg, out: Path) -> dict:
    """SFT and PPO-ptx sample one response per held-out test prompt (same seed); the gold labeler
    and the RM compare them; gold scores and criteria (closing rate...) of both."""
    from trainers.evaluation import generation, judges

    prompts = generation.read_prompts(out / "world" / "prompts" / "test.parquet")
    dirs = model_dirs(out)
    print(f"evaluation: sampling {len(prompts)} held-out test prompts with SFT and PPO-ptx", flush=True)
    responses = {
        name: generation.generate(dirs[name], prompts, batch_size=EVAL_BATCH_SIZE, **eval_sampling(cfg))
        for name in ("sft", "ppo_ptx")
    }
    gold = judges.win_rate(prompts, responses["ppo_ptx"], responses["sft"], judges.GoldJudge())
    rm_judge = judges.RewardModelJudge(out / "rm" / "model", batch_size=EVAL_BATCH_SIZE)
    rm = judges.win_rate(prompts, responses["ppo_ptx"], responses["sft"], rm_judge)
    examples = [
        {"prompt": p, "sft": s, "ppo_ptx": r}
        for p, s, r in list(zip(prompts, responses["sft"], responses["ppo_ptx"], strict=True))[:5]
    ]
    return {
        "eval/win_rate_gold": gold,
        "eval/win_rate_rm": rm,
        "eval/gold_scores": {name: judges.gold_scores(prompts, responses[name]) for name in responses},
        "eval/sampling": eval_sampling(cfg),
        "eval/examples": examples,
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


def default_runners() -> dict[str, Callable[[dict, Path], dict]]:
    """Stage name -> runner, for every stage but the report (which always runs: it is cheap)."""
    return {
        "world": run_world,
        **{stage: _ray_stage(stage) for stage in RAY_STAGES},
        "eval": run_evaluation,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def prepare(config: str | Path | None, overrides: Sequence[str], out_dir: str | Path, fresh: bool):
    """Every user error, before any work: config (all stages), output directory, the recorded config.
    Returns ``(out, configs, changed)`` with ``changed`` as :func:`changed_since_last_run` answers."""
    from trainers.runs.outdir import check_output_dir

    out = check_output_dir(out_dir)
    configs = stage_configs(config or DEFAULT_CONFIG, overrides, out)
    changed = ([], None) if fresh else changed_since_last_run(out, configs["base"])
    return out, configs, changed


def _run_stage(index: int, stage: str, title: str, runner, configs: dict, out: Path) -> tuple[dict, float]:
    """Run one stage (or skip it when its summary exists); print its progress and result lines."""
    head = f"[{index}/{len(STAGES)}] {title}"
    done = summary_path(out, stage)
    if done.is_file():
        summary = json.loads(done.read_text())
        seconds = stage_seconds(summary, stage) or 0.0
        print(f"{head}: done earlier, skipped ({done})", flush=True)
        print(result_line(stage, summary, seconds) + " [earlier run]", flush=True)
        return summary, seconds
    print(f"{head} ...", flush=True)
    start = time.time()
    summary = runner(configs, out)
    seconds = time.time() - start
    print(result_line(stage, summary, seconds), flush=True)
    return summary, seconds


def skipped_all(skipped: Sequence[str], summaries: Mapping) -> bool:
    """True while every stage so far was skipped (resuming); once one ran, later results are stale."""
    return len(skipped) == len(summaries)


def invalidate(out: Path, stage: str) -> None:
    """Remove a stage's earlier outputs (it must run again on its rerun inputs); prints what it did."""
    if (out / stage).exists():
        print(f"demo: an earlier stage ran again, so '{out / stage}' is rerun from scratch", flush=True)
        shutil.rmtree(out / stage)


def _shutdown_ray() -> None:
    """Stop the demo's Ray (frees the CPUs for the evaluation); nothing if it was never started."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_demo(
    config: str | Path | None,
    overrides: Sequence[str],
    out_dir: str | Path,
    fresh: bool = False,
    runners: Mapping[str, Callable[[dict, Path], dict]] | None = None,
) -> dict:
    """The whole demo into ``out_dir``; returns the report summary (also in ``OUT/report/summary.json``).

    ``runners`` replaces stage runners by name (tests); by default :func:`default_runners`.
    """
    from trainers.config import dump_yaml
    from trainers.files import atomic_write_text
    from trainers.runs.metrics import read_metrics

    start = time.time()
    out, configs, (diffs, first) = prepare(config, overrides, out_dir, fresh)
    if fresh:
        clear_outputs(out)
    elif first is not None:
        rerun_from(out, first, diffs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(configs["base"]))  # redacted, as every run's snapshot
    runners = {**default_runners(), **(runners or {})}
    summaries, timings, skipped = {}, {}, []
    try:
        for index, (stage, title) in enumerate(STAGES[:-1], start=1):
            if not skipped_all(skipped, summaries):
                invalidate(out, stage)  # an earlier stage ran again: this one's results are stale
            was_done = summary_path(out, stage).is_file()
            summaries[stage], timings[stage] = _run_stage(index, stage, title, runners[stage], configs, out)
            skipped += [stage] if was_done else []
            if stage == "ppo":
                _shutdown_ray()
    finally:
        _shutdown_ray()
    print(f"[{len(STAGES)}/{len(STAGES)}] report ...", flush=True)
    clock = time.time()
    summary = assemble_summary(summaries, read_metrics(out / "ppo" / "metrics.jsonl"), timings)
    summary |= {"stages_skipped": skipped, "config": str(Path(config or DEFAULT_CONFIG))}
    win_rates = {
        "PPO-ptx vs SFT (gold)": summaries["eval"]["eval/win_rate_gold"],
        "PPO-ptx vs SFT (RM)": summaries["eval"]["eval/win_rate_rm"],
    }
    path = write_demo_report(out, summary, win_rates)
    summary["timings_s"]["report"] = round(time.time() - clock, 1)
    summary["wall_time_s"] = round(time.time() - start, 1)
    written = update_json(path, {"timings_s": summary["timings_s"], "wall_time_s": summary["wall_time_s"]})
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
