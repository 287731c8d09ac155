"""``rlhf pipeline``: SFT -> RM -> PPO-ptx -> evaluation -> report on your own model and data, and the
stage loop with resume that ``rlhf demo`` runs too.

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
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainers.data import kind_paths
from trainers.errors import ConfigError, UserError
from trainers.evaluation.demo_report import (
    assemble_pipeline_summary,
    pipeline_closing_lines,
    result_line,
    stage_seconds,
    update_json,
    write_pipeline_report,
)

Runner = Callable[[dict, Path], dict]
"""A stage runner: ``(configs, out) -> summary``; it writes ``OUT/<stage>/summary.json`` last."""

RESULT_NEUTRAL_SECTIONS = ("cluster", "logging")
"""Sections whose values do not change results: they may differ when resuming."""


@dataclass(frozen=True)
class Layout:
    """What a command's stage loop runs: its stages in order and how a changed config maps onto them."""

    command: str
    """The command's name, first word of its own messages (``demo``, ``pipeline``)."""
    stages: tuple[tuple[str, str], ...]
    """``(directory / name, title)`` of every stage in order; the last is the report (always runs)."""
    ray_stages: tuple[str, ...]
    """Stages that run on the command's one Ray instance (shut down after the last of them)."""
    first_affected: Mapping[str, str]
    """Dotted key or section -> the first stage whose result it changes (a key wins over its section;
    neither listed: it changes none)."""
    owned_keys: tuple[str, ...]
    """Config keys the command sets per stage itself: never compared, an override is a user error."""
    owned_hint: str = ""
    """What the user-error line about an owned key suggests instead."""
    neutral_sections: tuple[str, ...] = field(default=RESULT_NEUTRAL_SECTIONS)
    """Sections that change no result (never compared)."""

    @property
    def names(self) -> list[str]:
        """Stage names in order."""
        return [name for name, _ in self.stages]

    def stage_of(self, key: str) -> str | None:
        """The first stage a changed dotted ``key`` affects, None if it affects none."""
        return self.first_affected.get(key, self.first_affected.get(key.split(".")[0]))

    def config_differences(self, old: Mapping, new: Mapping) -> list[str]:
        """Dotted keys whose values differ between two nested config dicts, except the owned keys and
        the neutral sections."""
        diffs = []
        for section in sorted(set(old) | set(new)):
            if section in self.neutral_sections:
                continue
            a, b = old.get(section) or {}, new.get(section) or {}
            for key in sorted(set(a) | set(b)):
                dotted = f"{section}.{key}"
                if dotted not in self.owned_keys and a.get(key) != b.get(key):
                    diffs.append(dotted)
        return diffs

    def first_changed_stage(self, diffs: Sequence[str]) -> str | None:
        """The earliest stage (in :attr:`stages` order) that a list of changed dotted keys affects."""
        affected = [stage for stage in map(self.stage_of, diffs) if stage is not None]
        return min(affected, key=self.names.index, default=None)


# --------------------------------------------------------------------------------------------------
# The stage loop with resume (shared by `rlhf pipeline` and `rlhf demo`)
# --------------------------------------------------------------------------------------------------


def summary_path(out: Path, stage: str) -> Path:
    """``OUT/<stage>/summary.json``: written last by every stage, so its presence means done."""
    return out / stage / "summary.json"


def check_overrides(overrides: Sequence[str], layout: Layout) -> None:
    """ConfigError if an override sets a key the command sets itself (``layout.owned_keys``)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in layout.owned_keys:
            raise ConfigError(
                f"override '{key}' is set by the {layout.command} for each stage; {layout.owned_hint}"
            )


def changed_since_last_run(out: Path, cfg, layout: Layout) -> tuple[list[str], str | None]:
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
    diffs = layout.config_differences(old, to_dict(cfg))
    return diffs, layout.first_changed_stage(diffs)


def rerun_from(out: Path, stage: str, diffs: Sequence[str], layout: Layout) -> None:
    """Remove the outputs of ``stage`` and every later one (the config changed under them)."""
    shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    print(
        f"{layout.command}: {shown} changed since the last run in {out}: rerunning from {stage}", flush=True
    )
    for name in layout.names[layout.names.index(stage) :]:
        shutil.rmtree(out / name, ignore_errors=True)


def clear_outputs(out: Path, layout: Layout) -> None:
    """``--fresh``: remove the stage directories and the recorded config (nothing else in OUT)."""
    for stage in layout.names:
        shutil.rmtree(out / stage, ignore_errors=True)
    (out / "config.yaml").unlink(missing_ok=True)


def start_output(out: Path, layout: Layout, cfg, fresh: bool, changed: tuple[list[str], str | None]) -> None:
    """After every check passed: clear (``fresh``) or rerun from the first changed stage, create ``out``
    and record ``cfg`` (redacted, as every run's snapshot) in ``OUT/config.yaml``."""
    from trainers.config import dump_yaml
    from trainers.files import atomic_write_text

    diffs, first = changed
    if fresh:
        clear_outputs(out, layout)
    elif first is not None:
        rerun_from(out, first, diffs, layout)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))


def run_stage(index: int, total: int, stage: str, title: str, runner: Runner, configs: dict, out: Path):
    """Run one stage (or skip it when its summary exists); print its progress and result lines.
    Returns ``(summary, seconds)``."""
    head = f"[{index}/{total}] {title}"
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


def invalidate(out: Path, stage: str, layout: Layout) -> None:
    """Remove a stage's earlier outputs (it must run again on its rerun inputs); prints what it did."""
    if (out / stage).exists():
        print(
            f"{layout.command}: an earlier stage ran again, so '{out / stage}' is rerun from scratch",
            flush=True,
        )
        shutil.rmtree(out / stage)


def shutdown_ray() -> None:
    """Stop the command's Ray (frees the CPUs for the evaluation); nothing if it was never started."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_stages(layout: Layout, configs: dict, out: Path, runners: Mapping[str, Runner]):
    """Every stage but the report, in order: skipped when done, rerun (with every later one) when an
    earlier one ran; Ray is shut down after the last Ray stage. Returns ``(summaries, seconds,
    skipped)``: per stage its summary and time, and the names of the skipped stages."""
    summaries: dict[str, dict] = {}
    timings: dict[str, float] = {}
    skipped: list[str] = []
    total = len(layout.stages)
    try:
        for index, (stage, title) in enumerate(layout.stages[:-1], start=1):
            if not skipped_all(skipped, summaries):
                invalidate(out, stage, layout)  # an earlier stage ran again: this one's results are stale
            was_done = summary_path(out, stage).is_file()
            summaries[stage], timings[stage] = run_stage(
                index, total, stage, title, runners[stage], configs, out
            )
            skipped += [stage] if was_done else []
            if layout.ray_stages and stage == layout.ray_stages[-1]:
                shutdown_ray()
    finally:
        shutdown_ray()
    return summaries, timings, skipped


def report_heading(layout: Layout) -> None:
    """The ``[N/N] report ...`` line."""
    print(f"[{len(layout.stages)}/{len(layout.stages)}] report ...", flush=True)


STAGE_FUNCTIONS = ("pretrain", "sft", "rm", "ppo")
"""Stages that :func:`ray_stage` runs with the functions their own commands call."""


def ray_stage(stage: str) -> Runner:
    """Runner of a Ray stage: join (or start, the first time) the command's Ray, then run the stage
    with the function ``rlhf <stage>`` calls (``trainers.stages.run_*``, ``trainers.ppo.driver.run_ppo``)."""
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"no Ray stage {stage!r}")

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


# --------------------------------------------------------------------------------------------------
# Evaluation shared with the demo: both models sample the same prompts, the RM judges
# --------------------------------------------------------------------------------------------------

EVAL_BATCH_SIZE = 32
"""Prompts per generation and RM batch in the evaluation stage."""


def eval_sampling(cfg) -> dict:
    """Evaluation decoding: the rollout's length and temperature, ``data.seed`` for both models."""
    return {
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "seed": cfg.data.seed,
    }


def sample_and_judge(
    prompts: Sequence[str], model_dirs: Mapping[str, Path], rm_dir: Path, sampling: Mapping
) -> tuple[dict[str, list[str]], dict]:
    """One response per prompt from each of ``model_dirs`` (baseline first, then the policy; same
    seed), and the RM-judged win rate of the policy over the baseline
    (:func:`trainers.evaluation.judges.win_rate`: ``score_a`` is the policy's mean RM score,
    ``score_b`` the baseline's). Returns ``(responses by name, win rate)``."""
    from trainers.evaluation import generation, judges

    responses = {
        name: generation.generate(path, prompts, batch_size=EVAL_BATCH_SIZE, **sampling)
        for name, path in model_dirs.items()
    }
    baseline, policy = list(model_dirs)
    rm_judge = judges.RewardModelJudge(rm_dir, batch_size=EVAL_BATCH_SIZE)
    return responses, judges.win_rate(prompts, responses[policy], responses[baseline], rm_judge)


def examples(prompts: Sequence[str], responses: Mapping[str, Sequence[str]], n: int = 5) -> list[dict]:
    """The first ``n`` prompts with every model's response (the report's examples)."""
    return [
        {"prompt": p, **{name: texts[i] for name, texts in responses.items()}}
        for i, p in enumerate(prompts[:n])
    ]


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


def finish_report(path: Path, summary: dict, start: float, clock: float) -> dict:
    """Add the report stage's time (since ``clock``) and the wall time (since ``start``) to the summary and
    to ``summary.json`` at ``path``; the summary as written."""
    summary["timings_s"]["report"] = round(time.time() - clock, 1)
    summary["wall_time_s"] = round(time.time() - start, 1)
    return update_json(path, {"timings_s": summary["timings_s"], "wall_time_s": summary["wall_time_s"]})


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
