"""``rlhf pipeline``: SFT -> RM -> PPO-ptx -> evaluation -> report on your own model and data, run by the
stage loop with resume that ``rlhf demo`` runs too (:mod:`trainers.pipeline.loop`).

    rlhf pipeline --config my.yaml --out runs/mine model.path=/models/my-instruct data.dir=/data/mine
    rlhf pipeline --config my.yaml --out runs/mine ppo.kl_coef=0.05   # reruns PPO, evaluation, report
    rlhf pipeline --config my.yaml --out runs/mine --fresh            # start over
    python -m trainers.cli pipeline ...                               # without the console script

Five stages, each in its own sub-directory of ``--out``::

    sft/     SFT of model.path on the demonstrations                 (trainers.stages.run_sft)
    rm/      reward model from OUT/sft/model on the comparisons      (trainers.stages.run_rm)
    ppo/     PPO(-ptx) of OUT/sft/model against OUT/rm/model         (trainers.ppo.driver.run_ppo)
    eval/    held-out prompts (prompts/test, else prompts/valid) sampled by SFT and PPO, judged by the
             RM: win rate of PPO over SFT and each one's mean RM score; pretraining loss of the
             starting model, SFT and PPO when pretraining text exists (pretrain/valid, else test)
    report/  summary.json, report.txt, report.png          (trainers.evaluation.report.write_report)

Decisions (docs/design.md, "rlhf pipeline and the shared stage loop (issue 14)"):

- **The user's model and data are inputs, the hand-offs are the pipeline's.** ``model.path`` is the
  starting model (required) and SFT trains it; the RM starts from ``OUT/sft/model``; PPO's policy from
  ``OUT/sft/model`` and its reward model is ``OUT/rm/model``. ``reward.path`` is the pipeline's own:
  an override is a user error, a value in the config file is replaced. ``model.tokenizer`` (if set)
  is the starting model's tokenizer; later stages read the one saved with the SFT model.
- **ptx needs pretraining text** (``data.pretrain``, else ``data.dir/pretrain/train``). Without it the
  run is plain PPO, said in one line at the start, when ``ppo.ptx_coef`` is 0 (its default); a
  ``ppo.ptx_coef > 0`` without text is a user error: that setting asks for something the data cannot
  give, and quietly dropping it would change the objective.
- **No gold judge**: the synthetic world's rule means nothing on real prompts. The RM judges, and
  since PPO optimised that very RM its win rate is an optimistic bound (the report says so).
- **Resume** as in the demo (the loop below is the demo's too): a stage whose ``summary.json`` exists
  is skipped and its earlier result line printed; ``OUT/config.yaml`` records the resolved config and a
  changed setting reruns from the first stage it affects (:data:`PIPELINE_FIRST_AFFECTED`), removing
  every later stage's outputs. ``--fresh`` deletes the stage directories first.
- Every user error (config, missing ``model.path``, missing data, unwritable ``--out``, ptx without
  text) exits 2 with one line before anything is written. Each stage still validates its own rows
  before its workers start.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainers.data import kind_paths
from trainers.errors import ConfigError, UserError
from trainers.evaluation.demo_report import (
    assemble_pipeline_summary,
    pipeline_closing_lines,
    write_pipeline_report,
)
from trainers.pipeline.loop import (
    Layout,
    Runner,
    changed_since_last_run,
    check_overrides,
    eval_sampling,
    examples,
    finish_report,
    ray_stage,
    report_heading,
    run_stages,
    sample_and_judge,
    start_output,
    summary_path,
)

# --------------------------------------------------------------------------------------------------
# The pipeline: stages, inputs, configs
# --------------------------------------------------------------------------------------------------

PIPELINE_RAY_STAGES = ("sft", "rm", "ppo")
PIPELINE_FIRST_AFFECTED = {
    "model": "sft",
    "data": "sft",
    "data.comparisons": "rm",
    "data.prompts": "ppo",
    "data.pretrain": "ppo",
    "sft": "sft",
    "rm": "rm",
    "rollout": "ppo",
    "reward": "ppo",
    "ppo": "ppo",
}
"""The first pipeline stage a changed key (or section) affects; ``pretrain.*`` (stage 0, which the
pipeline does not run), ``cluster.*`` and ``logging.*`` change none."""
PIPELINE_OWNED_KEYS = ("reward.path",)
"""The pipeline trains the reward model PPO uses (``OUT/rm/model``)."""
PIPELINE_MODELS = ("start", "sft", "ppo")
"""Models the pipeline evaluates: the user's ``model.path``, the SFT model and the PPO policy."""
EVAL_MAX_PROMPTS = 500
"""The evaluation samples at most this many held-out prompts (the first ones, in file order)."""
EVAL_MAX_TEXTS = 500
"""The pretraining loss reads at most this many held-out texts (the first ones, in file order)."""


def pipeline_layout(ptx: bool = True) -> Layout:
    """The pipeline's stages; PPO's title says whether the ptx term is on."""
    return Layout(
        command="pipeline",
        stages=(
            ("sft", "SFT"),
            ("rm", "reward model"),
            ("ppo", "PPO-ptx" if ptx else "PPO (ptx off)"),
            ("eval", "evaluation"),
            ("report", "report"),
        ),
        ray_stages=PIPELINE_RAY_STAGES,
        first_affected=PIPELINE_FIRST_AFFECTED,
        owned_keys=PIPELINE_OWNED_KEYS,
        owned_hint="it trains the reward model PPO uses in OUT/rm (run `rlhf ppo` to use another one)",
    )


def locate_data(data, kind: str, split: str) -> Path | None:
    """The path the stages read for ``split`` of ``kind`` (:func:`trainers.data.kind_paths`: ``data.<kind>``,
    else ``data.dir``'s layout), None when there is none (or it is ambiguous)."""
    try:
        return kind_paths(data, kind, split)[0]
    except UserError:
        return None


def describe_location(data, kind: str, split: str) -> str:
    """Why :func:`locate_data` found nothing: the data layer's own line (where it looked)."""
    try:
        return str(kind_paths(data, kind, split)[0])
    except UserError as err:
        return str(err)


NEEDED_DATA = (("demonstrations", "SFT"), ("comparisons", "the reward model"), ("prompts", "PPO"))
"""The train split of each kind, and the stage that reads it."""


@dataclass(frozen=True)
class PipelineInputs:
    """What the pipeline found in the user's data (:func:`check_inputs`)."""

    eval_prompts: Path
    """Held-out prompts of the evaluation: prompts/test, else prompts/valid."""
    pretrain_train: Path | None
    """Pretraining text for the ptx term (None: none found)."""
    pretrain_eval: Path | None
    """Held-out pretraining text for the pretraining loss: pretrain/valid, else test (None: none)."""
    ptx: bool
    """Whether PPO adds the ptx term (pretraining text found and ``ppo.ptx_coef > 0``)."""
    ptx_line: str
    """The line printed at the start saying whether and why ptx is on or off."""


def ptx_decision(ptx_coef: float, pretrain: Path | None, where: str) -> tuple[bool, str]:
    """``(ptx on, the line saying so)``; ConfigError for ``ptx_coef > 0`` without pretraining text
    (``where``: where it was looked for)."""
    if pretrain is None:
        if ptx_coef > 0:
            raise ConfigError(
                f"ppo.ptx_coef={ptx_coef:g} needs pretraining text, but none was found ({where}): give "
                "data.pretrain=PATH (or DIR/pretrain/train.jsonl), or set ppo.ptx_coef=0 for plain PPO"
            )
        return False, f"pipeline: ptx off: no pretraining data found ({where}); PPO runs without the ptx term"
    if ptx_coef == 0:
        return False, f"pipeline: ptx off: ppo.ptx_coef=0 (set it > 0 to add the LM loss on '{pretrain}')"
    return True, f"pipeline: PPO-ptx with ppo.ptx_coef={ptx_coef:g} on '{pretrain}'"


def check_start_model(cfg) -> None:
    """ConfigError unless ``model.path`` names a model directory: the pipeline starts from it."""
    if not cfg.model.path:
        raise ConfigError(
            "model.path is not set: rlhf pipeline starts from your model; give model.path=DIR "
            "(a Hugging Face model directory, e.g. an Instruct model)"
        )
    from trainers.runtime.models import check_model_dir

    check_model_dir(cfg.model.path, "model.path")


def check_inputs(cfg) -> PipelineInputs:
    """Every input the pipeline reads, before any work: the starting model, the train split of each
    kind, held-out prompts for the evaluation, and the ptx decision (:func:`ptx_decision`)."""
    check_start_model(cfg)
    data = cfg.data
    for kind, reader in NEEDED_DATA:
        if locate_data(data, kind, "train") is None:
            raise ConfigError(f"no {kind} for {reader}: {describe_location(data, kind, 'train')}")
    eval_prompts = locate_data(data, "prompts", "test") or locate_data(data, "prompts", "valid")
    if eval_prompts is None:
        raise ConfigError(
            "no held-out prompts for the evaluation: looked for "
            f"{describe_location(data, 'prompts', 'test')} and {describe_location(data, 'prompts', 'valid')}"
        )
    if eval_prompts == locate_data(data, "prompts", "train"):
        print(
            f"pipeline: warning: the evaluation's prompts are the training prompts ({eval_prompts}): give "
            "held-out ones (prompts/test, or {split} in data.prompts) for numbers that mean something",
            flush=True,
        )
    pretrain = locate_data(data, "pretrain", "train")
    ptx, line = ptx_decision(cfg.ppo.ptx_coef, pretrain, describe_location(data, "pretrain", "train"))
    held_out = locate_data(data, "pretrain", "valid") or locate_data(data, "pretrain", "test")
    return PipelineInputs(eval_prompts, pretrain, held_out, ptx, line)


def stage_paths(cfg, out: Path, stage: str):
    """Give ``cfg`` (a loaded :class:`~trainers.config.Config`, changed in place and returned) the
    pipeline's paths for ``stage`` (``base``: the user's own, as recorded): SFT starts from the user's
    ``model.path``; the RM and PPO from ``OUT/sft/model`` with the tokenizer saved there; PPO's reward
    model is ``OUT/rm/model``. Set on the dataclasses, not as override text, so any path works."""
    if stage in ("rm", "ppo"):
        cfg.model.path = str(out / "sft" / "model")
        cfg.model.tokenizer = None
    cfg.reward.path = str(out / "rm" / "model") if stage == "ppo" else None
    return cfg.validate()


def pipeline_configs(config: str | Path, overrides: Sequence[str], out: Path) -> dict:
    """``{"base": Config, "sft": ..., "rm": ..., "ppo": ...}``: the user's config, and per Ray stage
    with the pipeline's paths; every one loaded and validated here, so a bad value fails before work."""
    from trainers.config import load_config

    check_overrides(overrides, pipeline_layout())
    return {
        stage: stage_paths(load_config(config, list(overrides)), out, stage)
        for stage in ("base", *PIPELINE_RAY_STAGES)
    }


def prepare(config: str | Path, overrides: Sequence[str], out_dir: str | Path, fresh: bool):
    """Every user error, before any work: config (all stages), inputs, output directory, the recorded
    config. Returns ``(out, configs, inputs, changed)`` with ``changed`` as
    :func:`changed_since_last_run` answers."""
    from trainers.runs.outdir import check_output_dir

    out = check_output_dir(out_dir)
    configs = pipeline_configs(config, overrides, out)
    inputs = check_inputs(configs["base"])
    layout = pipeline_layout(inputs.ptx)
    changed = ([], None) if fresh else changed_since_last_run(out, configs["base"], layout)
    return out, configs, inputs, changed


# --------------------------------------------------------------------------------------------------
# Evaluation and the run
# --------------------------------------------------------------------------------------------------


def model_dirs(cfg, out: Path) -> dict[str, Path]:
    """The model directory of each evaluated model (:data:`PIPELINE_MODELS`)."""
    return {"start": Path(cfg.model.path), "sft": out / "sft" / "model", "ppo": out / "ppo" / "model"}


def pretrain_losses(cfg, out: Path, path: Path) -> dict[str, float]:
    """Pretraining loss of each evaluated model on the first :data:`EVAL_MAX_TEXTS` texts of ``path``
    (the alignment tax); the starting model only when its directory holds its tokenizer."""
    from trainers.evaluation import lm_loss

    texts = lm_loss.read_texts(path)[:EVAL_MAX_TEXTS]
    dirs = model_dirs(cfg, out)
    if not (dirs["start"] / "tokenizer.json").is_file():
        del dirs[
            "start"
        ]  # its tokenizer is elsewhere (model.tokenizer): the loss needs it beside the weights
    return {name: lm_loss.pretrain_loss(d, texts, max_len=cfg.model.max_len) for name, d in dirs.items()}


def evaluation_runner(inputs: PipelineInputs) -> Runner:
    """The evaluation stage on the user's data: ``OUT/eval/summary.json`` with the RM win rate of PPO
    over SFT (``score_a``/``score_b``: their mean RM scores), the pretraining losses (None without
    held-out pretraining text), the sampling, the prompts file and five examples."""

    def run(configs: dict, out: Path) -> dict:
        from trainers.evaluation import generation
        from trainers.files import atomic_write_json

        start = time.time()
        cfg = configs["base"]
        prompts = generation.read_prompts(inputs.eval_prompts, EVAL_MAX_PROMPTS)
        print(
            f"evaluation: sampling {len(prompts)} held-out prompts ({inputs.eval_prompts}) with SFT and PPO",
            flush=True,
        )
        dirs = model_dirs(cfg, out)
        responses, rm = sample_and_judge(
            prompts, {"sft": dirs["sft"], "ppo": dirs["ppo"]}, out / "rm" / "model", eval_sampling(cfg)
        )
        loss = pretrain_losses(cfg, out, inputs.pretrain_eval) if inputs.pretrain_eval else None
        summary = {
            "eval/win_rate_rm": rm,
            "eval/pretrain_loss": loss,
            "eval/prompts": str(inputs.eval_prompts),
            "eval/sampling": eval_sampling(cfg),
            "eval/examples": examples(prompts, responses),
            "eval/wall_time_s": round(time.time() - start, 2),
        }
        atomic_write_json(summary_path(out, "eval"), summary)
        return summary

    return run


def default_runners(inputs: PipelineInputs) -> dict[str, Runner]:
    """Stage name -> runner for every pipeline stage but the report."""
    return {**{stage: ray_stage(stage) for stage in PIPELINE_RAY_STAGES}, "eval": evaluation_runner(inputs)}


def run_pipeline(
    config: str | Path,
    overrides: Sequence[str],
    out_dir: str | Path,
    fresh: bool = False,
    runners: Mapping[str, Runner] | None = None,
) -> dict:
    """The whole pipeline into ``out_dir``; returns the report summary (also ``OUT/report/summary.json``).

    ``runners`` replaces stage runners by name (tests); by default :func:`default_runners`.
    """
    from trainers.runs.metrics import read_metrics

    start = time.time()
    out, configs, inputs, changed = prepare(config, overrides, out_dir, fresh)
    layout = pipeline_layout(inputs.ptx)
    print(inputs.ptx_line, flush=True)
    start_output(out, layout, configs["base"], fresh, changed)
    runners = {**default_runners(inputs), **(runners or {})}
    summaries, timings, skipped = run_stages(layout, configs, out, runners)
    report_heading(layout)
    clock = time.time()
    summary = assemble_pipeline_summary(summaries, read_metrics(out / "ppo" / "metrics.jsonl"), timings)
    summary |= {
        "ptx": {"on": inputs.ptx, "ptx_coef": configs["ppo"].ppo.ptx_coef, "note": inputs.ptx_line},
        "start_model": configs["base"].model.path,
        "stages_skipped": skipped,
        "config": str(config),
    }
    path = write_pipeline_report(out, summary, {"PPO vs SFT (RM)": summaries["eval"]["eval/win_rate_rm"]})
    written = finish_report(path, summary, start, clock)
    print(pipeline_closing_lines(written, out), flush=True)
    return written


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_HELP = "SFT, reward model, PPO-ptx, evaluation and report on your own model (model.path) and data"


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--out``, ``--fresh`` and dotted overrides."""
    p.add_argument(
        "--config", required=True, metavar="FILE", help="YAML config (e.g. one of trainers/configs/)"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (sft/, rm/, ppo/, eval/, report/)"
    )
    p.add_argument("--fresh", action="store_true", help="delete earlier stage outputs in DIR and start over")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides, e.g. model.path=DIR data.dir=DIR ppo.kl_coef=0.05",
    )


def _run(args: argparse.Namespace) -> int:
    """Run the pipeline; exit code 0 when every stage finished."""
    run_pipeline(args.config, args.overrides, args.out, fresh=args.fresh)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pipeline`` to the top-level ``rlhf`` CLI."""
    p = sub.add_parser("pipeline", help=_HELP, description=_HELP)
    add_pipeline_arguments(p)
    p.set_defaults(func=_run)
