"""Advantage estimators on the synthetic world (issue 15): the demo's PPO-ptx (GAE with a critic)
against the critic-free GRPO, RLOO and REINFORCE++-baseline on the demo's learned RM, and GRPO on the
world's gold labeler as the only reward (RLVR-style), at the same number of sampled sequences per run.

    rlhf demo --out /tmp/demo                                        # once (or let the script do it)
    python tests/bench/estimators.py --from /tmp/demo --out /tmp/est                     # 5 x 3 seeds
    python tests/bench/estimators.py --from /tmp/demo --out /tmp/est --variants ppo_ptx,grpo_gold \\
        --seeds 0 --iterations 2                                                         # a smoke run

Each run is ``OUT/runs/<variant>_seed<s>/`` (a PPO output directory), cached and evaluated exactly as
in alignment_tax.py (``_bench_runs.py``: keyed caches, the demo's evaluation against SFT on the test
prompts). Results: ``tests/bench/results/estimators.json`` (``--json``) and a table on stdout.
Write-up: docs/estimators.md.

Decisions:

- **Config**: the demo's recorded ``DEMO/config.yaml`` and PPO paths; each variant changes only
  :data:`VARIANTS`' keys (and ``ppo.seed``, ``--iterations``). PPO-ptx's ``ptx_coef`` stays in every
  variant, so what differs is the estimator and where the KL goes, not the pretraining term.
- **Same sequences**: the group variants sample :data:`GROUP_SIZE` responses for each of
  ``rows / GROUP_SIZE`` prompts, where ``rows`` is the demo's prompts x samples per iteration; so every
  run samples and trains on as many sequences per iteration, and in all, as the demo's PPO.
- **KL**: GRPO takes it as a loss term (k3, :data:`KL_LOSS_COEF`, no KL in the reward), as in the
  GRPO paper; RLOO and REINFORCE++-baseline keep the demo's KL in the reward (``ppo.kl_coef``).
- **Gold variant**: ``reward.path`` unset after the demo's paths are applied, so the gold labeler
  (``reward.function``) is the only score; the learned RM still judges its policy at evaluation.
- **Wall time per iteration**: the mean over iterations of the run's ``timing/*`` phases (no actor
  start-up), and the run's wall time over its iterations (with start-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from tests.bench import _bench_runs as bench  # noqa: E402
from trainers.errors import UserError  # noqa: E402

TAG = "estimators"
"""First word of this bench's lines."""
DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "estimators.json"
GROUP_SIZE = 4
"""``ppo.samples_per_prompt`` of the group variants."""
KL_LOSS_COEF = 0.1
"""GRPO's ``ppo.kl_loss_coef`` (k3): the demo's ``kl_coef`` moved from the reward into the loss."""
GOLD_REWARD = "trainers.data.gold:reward"
"""The world's gold labeler as a reward function."""


@dataclass(frozen=True)
class Variant:
    """One compared configuration: the demo's PPO config with ``overrides``."""

    title: str
    """What it is, in a few words (table legend, JSON)."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides on the demo's config."""
    grouped: bool = False
    """Sample :data:`GROUP_SIZE` responses per prompt (fewer prompts, as many sequences)."""
    learned_rm: bool = True
    """Score with the demo's RM; False: ``reward.path`` unset, another source is the only reward."""


_GRPO = (
    "ppo.advantage=grpo",
    "ppo.kl_coef=0",
    f"ppo.kl_loss_coef={KL_LOSS_COEF}",
    "ppo.kl_loss_estimator=k3",
)
VARIANTS = {
    "ppo_ptx": Variant("PPO-ptx: GAE with a critic, KL in the reward (the demo's run)"),
    "grpo_rm": Variant("GRPO on the RM, k3 KL loss term", _GRPO, grouped=True),
    "rloo_rm": Variant("RLOO on the RM, KL in the reward", ("ppo.advantage=rloo",), grouped=True),
    "reinforce_pp_baseline_rm": Variant(
        "REINFORCE++-baseline on the RM, KL in the reward",
        ("ppo.advantage=reinforce_pp_baseline",),
        grouped=True,
    ),
    "grpo_gold": Variant(
        "GRPO on the gold labeler only, k3 KL loss term",
        (*_GRPO, f"reward.function={GOLD_REWARD}"),
        grouped=True,
        learned_rm=False,
    ),
}
METRICS = (
    "gold_win_rate",
    "rm_win_rate",
    "gold_score",
    "rm_score",
    "kl_to_sft",
    "pretrain_loss",
    "closing_rate",
    "no_repetition_rate",
    "iteration_time_s",
    "wall_time_per_iteration_s",
)
"""Per-run numbers aggregated over seeds."""


# --------------------------------------------------------------------------------------------------
# Arguments and runs
# --------------------------------------------------------------------------------------------------


def variant_list(text: str) -> list[str]:
    """``"ppo_ptx,grpo_gold"`` -> names of :data:`VARIANTS`, distinct, order kept."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="advantage estimators (PPO-ptx, GRPO, RLOO, REINFORCE++)")
    p.add_argument("--from", dest="demo", metavar="DEMO_OUT", help="a finished `rlhf demo` output directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the PPO runs and evaluations go")
    p.add_argument("--variants", default=",".join(VARIANTS), type=variant_list, help="variant names")
    p.add_argument(
        "--seeds", default="0,1,2", type=lambda s: bench.number_list(int, s), help="ppo.seed values"
    )
    p.add_argument("--iterations", type=int, help="ppo.iterations (default: the demo's)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


def run_name(variant: str, seed: int) -> str:
    """``grpo_rm_seed1``: the directory of one PPO run."""
    return f"{variant}_seed{seed}"


def group_sampling(demo: Path) -> list[str]:
    """Overrides that sample :data:`GROUP_SIZE` responses per prompt and as many rows per iteration as
    the demo's PPO; UserError if its rows do not split into such groups."""
    ppo = bench.demo_config(demo, []).ppo
    rows = ppo.prompts_per_iteration * ppo.samples_per_prompt
    if rows % GROUP_SIZE:
        raise UserError(
            f"the demo samples {rows} sequences per PPO iteration, not a multiple of {GROUP_SIZE}: "
            "the group variants could not sample as many"
        )
    return [f"ppo.samples_per_prompt={GROUP_SIZE}", f"ppo.prompts_per_iteration={rows // GROUP_SIZE}"]


def variant_config(demo: Path, name: str, seed: int, iterations: int | None, grouping: Sequence[str]):
    """The demo's PPO config as variant ``name`` with ``ppo.seed`` (and ``ppo.iterations``); ``grouping``
    from :func:`group_sampling`."""
    v = VARIANTS[name]
    overrides = [*(grouping if v.grouped else ()), *v.overrides, f"ppo.seed={seed}"]
    overrides += [f"ppo.iterations={iterations}"] if iterations else []
    cfg = bench.demo_config(demo, overrides)
    if not v.learned_rm:
        cfg.reward.path = None  # the demo's paths set it; the other sources are the whole reward
    return cfg.validate()


def sequences(cfg) -> int:
    """Sequences a run samples (and trains on) in all."""
    p = cfg.ppo
    return p.iterations * p.prompts_per_iteration * p.samples_per_prompt


def describe(cfg) -> str:
    """What a run is, for the line that starts it."""
    p, sources = cfg.ppo, "+".join(cfg.reward.sources())
    return f"{p.advantage} on {sources}, {p.prompts_per_iteration}x{p.samples_per_prompt} per iteration, seed {p.seed}"


def run_all(demo: Path, out: Path, args: argparse.Namespace, code: Mapping) -> dict:
    """Every (variant, seed) PPO run (all variants for the first seed first, so an interrupted sweep
    still has a full comparison); ``{name: (cfg, summary)}``."""
    grouping = group_sampling(demo)
    plan = [
        (run_name(v, seed), variant_config(demo, v, seed, args.iterations, grouping))
        for seed in args.seeds
        for v in args.variants
    ]
    budgets = {name: sequences(cfg) for name, cfg in plan}
    if len(set(budgets.values())) != 1:  # the comparison's premise: a bug here, not a user error
        raise AssertionError(f"variants sample different numbers of sequences: {budgets}")
    return bench.run_all(plan, demo, out, code, describe, tag=TAG)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def iteration_times(records: Sequence[Mapping], summary: Mapping) -> dict:
    """Seconds per iteration: the mean over ``records`` (metrics.jsonl) of the summed ``timing/*``
    phases, and the run's wall time (actor start-up included) over the iterations it ran."""
    phases = [sum(v for k, v in r.items() if k.startswith("timing/")) for r in records]
    ran = summary["ppo/iterations"] - summary.get("ppo/resumed_from_iteration", 0)
    return {
        "iteration_time_s": statistics.fmean(phases) if phases else None,
        "wall_time_per_iteration_s": summary["ppo/wall_time_s"] / ran if ran else None,
    }


def run_record(name: str, variant: str, cfg, summary: Mapping, result: Mapping, run_dir: Path) -> dict:
    """The flat per-run numbers the table, the aggregate and the JSON use."""
    from trainers.runs.metrics import read_metrics

    gold, rm, g = result["win_rate_gold"], result["win_rate_rm"], result["gold_scores"]
    return {
        "run": name,
        "variant": variant,
        "seed": cfg.ppo.seed,
        "advantage": cfg.ppo.advantage,
        "reward_sources": cfg.reward.sources(),
        "sequences": sequences(cfg),
        "gold_win_rate": gold["win_rate"],
        "gold_win_rate_ci95": [gold["ci_low"], gold["ci_high"]],
        "gold_counts": {k: gold[k] for k in ("wins", "ties", "losses", "n")},
        "rm_win_rate": rm["win_rate"],
        "rm_win_rate_ci95": [rm["ci_low"], rm["ci_high"]],
        "rm_counts": {k: rm[k] for k in ("wins", "ties", "losses", "n")},
        "gold_score": g["score"],
        "rm_score": rm["score_a"],  # the policy's mean RM score on the test prompts
        "rm_score_sft": rm["score_b"],  # SFT's, on the same prompts (the same responses in every run)
        "kl_to_sft": result["kl_to_sft"],
        "pretrain_loss": result["pretrain_loss"],
        "closing_rate": g["closing"],
        "correct_rate": g["correct"],
        "no_repetition_rate": g["no_repetition"],  # repeating the closing is how the RM gets hacked here
        "train_score_last_quarter": summary.get("ppo/score_last_quarter"),  # of its own reward
        **iteration_times(read_metrics(run_dir / "metrics.jsonl"), summary),
        "ppo_wall_time_s": summary.get("ppo/wall_time_s"),
        "eval_wall_time_s": result["eval_wall_time_s"],
    }


def pooled_win_rate(counts: Sequence[Mapping]) -> dict:
    """Win rate (ties as half) and Wilson 95% interval of all seeds' comparisons together. The seeds
    share the test prompts, so this interval shows the comparisons' noise, not the seed-to-seed spread."""
    from trainers.evaluation.judges import wilson_interval

    n = sum(c["n"] for c in counts)
    score = sum(c["wins"] + 0.5 * c["ties"] for c in counts)
    low, high = wilson_interval(score, n)
    return {"win_rate": score / n, "ci_low": low, "ci_high": high, "n": n}


def aggregate(records: Sequence[Mapping]) -> dict:
    """``{variant: {metric: spread over seeds, pooled gold/RM win rates, RM minus gold win rate}}``."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == variant]
        out[variant] = {
            m: bench.spread([r[m] for r in rs]) for m in METRICS if None not in (r[m] for r in rs)
        }
        out[variant]["gold_win_rate_pooled"] = pooled_win_rate([r["gold_counts"] for r in rs])
        out[variant]["rm_win_rate_pooled"] = pooled_win_rate([r["rm_counts"] for r in rs])
        out[variant]["rm_minus_gold_win_rate"] = (
            out[variant]["rm_win_rate"]["mean"] - out[variant]["gold_win_rate"]["mean"]
        )
    return out


def table(ref: Mapping, records: Sequence[Mapping], agg: Mapping) -> str:
    """The text table: one line per run, then the seed means per variant, then the references."""
    cols = (
        f"{'gold win':>9}{'95% CI':>16}{'RM win':>8}{'gold':>7}{'RM':>7}{'KL':>7}{'pretrain':>9}{'s/it':>6}"
    )
    head = f"{'run':<30}{cols}"
    lines = [head, "-" * len(head)]
    for r in records:
        lo, hi = r["gold_win_rate_ci95"]
        lines.append(
            f"{r['run']:<30}{r['gold_win_rate']:>9.3f}{f'[{lo:.3f}, {hi:.3f}]':>16}{r['rm_win_rate']:>8.3f}"
            f"{r['gold_score']:>7.3f}{r['rm_score']:>7.2f}{r['kl_to_sft']:>7.2f}{r['pretrain_loss']:>9.3f}"
            f"{r['iteration_time_s']:>6.2f}"
        )
    lines.append("-" * len(head))
    for variant, m in agg.items():
        pooled = m["gold_win_rate_pooled"]
        label = f"{variant}, seeds: {m['gold_win_rate']['n']}"
        ci = f"[{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]"
        lines.append(
            f"{label:<30}{m['gold_win_rate']['mean']:>9.3f}{ci:>16}{m['rm_win_rate']['mean']:>8.3f}"
            f"{m['gold_score']['mean']:>7.3f}{m['rm_score']['mean']:>7.2f}{m['kl_to_sft']['mean']:>7.2f}"
            f"{m['pretrain_loss']['mean']:>9.3f}{m['iteration_time_s']['mean']:>6.2f}"
        )
    loss, sft = ref["pretrain_loss"], ref["gold_scores_sft"]
    lines.append(
        f"SFT: gold score {sft['score']:.3f}, RM score {records[0]['rm_score_sft']:.2f}; "
        f"pretraining loss base {loss['base']:.3f}, SFT {loss['sft']:.3f} "
        "(per-seed CI: Wilson per run; seed means: CI of the pooled comparisons)"
    )
    return "\n".join(lines)


def changed_settings(base, cfg) -> dict:
    """``{dotted key: value}`` where ``cfg`` differs from ``base`` (both resolved configs)."""
    from trainers.config import to_dict

    new = to_dict(cfg)
    out = {}
    for key in bench.differences(to_dict(base), new):
        value = new
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def results_document(args, demo: Path, ref: Mapping, records: Sequence[Mapping], runs, env: Mapping) -> dict:
    """Everything ``estimators.json`` holds: reference numbers, variants, runs, aggregates, provenance."""
    from trainers.config import to_dict

    first = {}  # each variant's config at its first seed
    for r in records:
        first.setdefault(r["variant"], runs[r["run"]][0])
    base = variant_config(demo, "ppo_ptx", records[0]["seed"], args.iterations, ())
    agg = aggregate(records)
    common = [m for m in METRICS if all(m in metrics for metrics in agg.values())]
    return {
        "experiment": "advantage estimators: PPO-ptx vs GRPO, RLOO, REINFORCE++-baseline (RM) and GRPO (gold)",
        "command": " ".join(["python tests/bench/estimators.py", *sys.argv[1:]]),
        "demo": str(demo),
        "reference": {
            "pretrain_loss": ref["pretrain_loss"],
            "gold_score_sft": ref["gold_scores_sft"]["score"],
            "rm_score_sft": records[0]["rm_score_sft"],
            "closing_rate_sft": ref["gold_scores_sft"]["closing"],
            "no_repetition_rate_sft": ref["gold_scores_sft"]["no_repetition"],
            "n_test_prompts": len(ref["sft_responses"]),
            "sampling": ref["sampling"],
        },
        "demo_report": bench.demo_reference(demo),
        "variants": {
            v: {"title": VARIANTS[v].title, "changed_from_demo": changed_settings(base, cfg)}
            for v, cfg in first.items()
        },
        "runs": list(records),
        "by_variant": agg,
        "vs_ppo_ptx": bench.against(agg, "ppo_ptx", common),
        "config": {"ppo_ptx": {"ppo": to_dict(base)["ppo"], "rollout": to_dict(base)["rollout"]}},
        "seeds": list(args.seeds),
        "environment": dict(env),
        "compute_time_s": round(sum(r["ppo_wall_time_s"] + r["eval_wall_time_s"] for r in records), 1),
    }


def experiment(args: argparse.Namespace) -> dict:
    """Run the sweep and the evaluation; the results written to ``args.json`` (and returned)."""
    start = bench.prelude(args, tag=TAG)
    runs = run_all(start.demo, start.out, args, start.code)
    ref, evals = bench.evaluate_all(start.demo, start.out, runs, start.code, tag=TAG)
    variant_of = {run_name(v, seed): v for seed in args.seeds for v in args.variants}
    records = [
        run_record(name, variant_of[name], cfg, summary, evals[name], start.out / "runs" / name)
        for name, (cfg, summary) in runs.items()
    ]
    results = results_document(args, start.demo, ref, records, runs, start.env)
    return bench.write_results(start, results, table(ref, records, results["by_variant"]), tag=TAG)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0, or 2 with one line for a user error (missing demo, bad config...)."""
    return bench.cli_main(experiment, parse_args(argv), tag=TAG)


if __name__ == "__main__":  # vLLM engines start processes (spawn): the guard is required
    sys.exit(main())
