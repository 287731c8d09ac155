"""The stage loop with resume that ``rlhf demo`` and ``rlhf pipeline`` share: a :class:`Layout` of stages,
each run by a :data:`Runner` into ``OUT/<stage>/`` and skipped when its ``summary.json`` exists; a changed
setting reruns from the first stage it affects; and the evaluation both commands measure with
(:func:`eval_sampling`, :func:`sample_and_judge`). The decisions: docs/design.md, "rlhf pipeline and the
shared stage loop (issue 14)".
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainers.errors import ConfigError
from trainers.evaluation.demo_report import (
    result_line,
    stage_seconds,
    update_json,
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


def finish_report(path: Path, summary: dict, start: float, clock: float) -> dict:
    """Add the report stage's time (since ``clock``) and the wall time (since ``start``) to the summary and
    to ``summary.json`` at ``path``; the summary as written."""
    summary["timings_s"]["report"] = round(time.time() - clock, 1)
    summary["wall_time_s"] = round(time.time() - start, 1)
    return update_json(path, {"timings_s": summary["timings_s"], "wall_time_s": summary["wall_time_s"]})
