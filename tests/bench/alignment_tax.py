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
- **Evaluation, one Ray instance, keyed caches**: as every bench here (``_bench_runs.py``): the
  demo's evaluation (one sample per test prompt at the rollout temperature with the world's seed, so
  the SFT responses are the same for every run; gold win rate with ties as half and a Wilson 95%
  interval; pretraining loss with ``model.max_len`` windows). ``ppo.seed`` changes rollout sampling,
  minibatch order and the ptx rows: its spread is the seed noise the γ effect is compared with. A
  cached run or evaluation is reused only when it was made with the same settings and a clean tree at
  the same commit; otherwise one line says what differed and it is made again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from tests.bench import _bench_runs as bench  # noqa: E402

TAG = "alignment_tax"
"""First word of this bench's lines."""
DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "alignment_tax.json"
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


# --------------------------------------------------------------------------------------------------
# Arguments and runs
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        description="alignment tax: PPO (ptx_coef 0) vs PPO-ptx on the synthetic world"
    )
    p.add_argument("--from", dest="demo", metavar="DEMO_OUT", help="a finished `rlhf demo` output directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the PPO runs and evaluations go")
    p.add_argument(
        "--ptx-coefs", default="0,0.5", type=lambda s: bench.number_list(float, s), help="γ values"
    )
    p.add_argument("--seeds", default="0", type=lambda s: bench.number_list(int, s), help="ppo.seed values")
    p.add_argument("--iterations", type=int, help="ppo.iterations (default: the demo's)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


def run_name(coef: float, seed: int) -> str:
    """``ptx0.5_seed1``: the directory of one PPO run."""
    return f"ptx{coef:g}_seed{seed}"


def ppo_config(demo: Path, coef: float, seed: int, iterations: int | None):
    """The demo's PPO config with ``ppo.ptx_coef``/``ppo.seed`` (and ``ppo.iterations``) changed."""
    overrides = [f"ppo.ptx_coef={coef}", f"ppo.seed={seed}"]
    overrides += [f"ppo.iterations={iterations}"] if iterations else []
    return bench.demo_config(demo, overrides)


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
    # all γ for seed 0 first: an interrupted sweep still has a full comparison
    plan = [
        (run_name(coef, seed), ppo_config(demo, coef, seed, iterations)) for seed in seeds for coef in coefs
    ]
    return bench.run_all(plan, demo, out, code, describe, tag=TAG)


def describe(cfg) -> str:
    """What a run varies, for the line that starts it."""
    return f"ptx_coef {cfg.ppo.ptx_coef:g}, seed {cfg.ppo.seed}"


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


def aggregate(records: Sequence[Mapping]) -> dict:
    """``{"<γ>": {metric: spread over seeds}}`` for every γ run."""
    coefs = sorted({r["ptx_coef"] for r in records})
    return {
        f"{c:g}": {m: bench.spread([r[m] for r in records if r["ptx_coef"] == c]) for m in METRICS}
        for c in coefs
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
        "demo_report": bench.demo_reference(demo),
        "runs": list(records),
        "by_ptx_coef": agg,
        "vs_ptx_coef_0": bench.against(agg, "0", METRICS),
        "config": {
            "ppo": resolved["ppo"] | {"ptx_coef": list(args.ptx_coefs), "seed": list(args.seeds)},
            "rollout": resolved["rollout"],
        },
        "environment": dict(env),
        "compute_time_s": round(sum(r["ppo_wall_time_s"] + r["eval_wall_time_s"] for r in records), 1),
    }


def experiment(args: argparse.Namespace) -> dict:
    """Run the sweep and the evaluation; the results written to ``args.json`` (and returned)."""
    start = bench.prelude(args, tag=TAG)
    runs = run_all(start.demo, start.out, args.ptx_coefs, args.seeds, args.iterations, start.code)
    cfg = next(iter(runs.values()))[0]
    ref, evals = bench.evaluate_all(start.demo, start.out, runs, start.code, tag=TAG)
    records = [run_record(name, c, summary, evals[name]) for name, (c, summary) in runs.items()]
    results = results_document(args, start.demo, ref, records, cfg, start.env)
    return bench.write_results(start, results, table(ref, records, results["by_ptx_coef"]), tag=TAG)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0, or 2 with one line for a user error (missing demo, bad config...)."""
    return bench.cli_main(experiment, parse_args(argv), tag=TAG)


if __name__ == "__main__":  # vLLM engines start processes (spawn): the guard is required
    sys.exit(main())
