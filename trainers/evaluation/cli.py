"""``rlhf eval``: win rate of one model over another, held-out zero-shot accuracy, pretraining loss.

    rlhf eval --policy runs/ppo --baseline runs/sft --prompts P.parquet --reward runs/rm --out win.json
    rlhf eval --policy runs/ppo --baseline runs/sft --prompts world/prompts/test.parquet --judge gold
    rlhf eval --policy runs/ppo --heldout-cluster sentiment --data-dir world
    rlhf eval --policy runs/ppo --pretrain-file world/pretrain/valid.parquet

Each part runs when its inputs are given (at least one must be). Model directories may be a stage's
output directory (holding ``model/``) or the model directory itself. The win rate's judge is the
reward model when one is given (``--reward DIR``, else ``reward.path`` of the config; ``--judge rm:DIR``
too); ``--judge gold`` is the synthetic world's hidden rule, meaningful only on the world's prompts.
Neither given is a user error: no judge is right for every prompt. Defaults come from the config
(``--config FILE`` and dotted overrides): ``rollout.max_new_tokens``, ``rollout.temperature``,
``data.dir``, ``model.max_len``. Every user error (missing directory, no safetensors, unknown
cluster, bad prompts file) exits 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.config import add_config_args
from trainers.errors import UserError

_HELP = "evaluate a model: win rate over a baseline, held-out zero-shot accuracy, pretraining loss"
JUDGE_HINT = "use 'rm' (the reward model: --reward DIR or reward.path), 'rm:DIR' or 'gold' (the synthetic world's rule)"
"""The valid judges, as the unknown-judge line lists them."""


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``rlhf eval`` (besides ``--config`` and overrides)."""
    p.add_argument(
        "--policy", required=True, metavar="DIR", help="model to evaluate (model dir or stage output)"
    )
    p.add_argument("--baseline", metavar="DIR", help="model to compare against (win rate)")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts for the win rate: a JSONL/Parquet file or save_to_disk directory ('prompt' or 'messages')",
    )
    p.add_argument(
        "--judge",
        metavar="rm|gold|rm:DIR",
        help="who compares responses: the reward model (default when one is given) or 'gold' (the synthetic "
        "world's rule)",
    )
    p.add_argument(
        "--reward", metavar="DIR", help="reward model that judges the win rate (default reward.path)"
    )
    p.add_argument("--n", type=int, metavar="N", help="use only the first N prompts")
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="response length (default rollout.max_new_tokens)"
    )
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default rollout.temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same for both models)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="prompts per generation batch")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation backend (default hf)")
    p.add_argument(
        "--heldout-cluster", metavar="NAME", help="task cluster for zero-shot accuracy (e.g. sentiment)"
    )
    p.add_argument(
        "--data-dir", metavar="DIR", help="data directory with heldout/test.parquet (default data.dir)"
    )
    p.add_argument(
        "--heldout-file", metavar="FILE", help="held-out rows file instead of DATA_DIR/heldout/test.parquet"
    )
    p.add_argument(
        "--method", choices=("rank", "generate"), default="rank", help="OPTIONS scoring (default rank)"
    )
    p.add_argument("--pretrain-file", metavar="FILE", help="pretraining text file: report the LM loss on it")
    p.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")


def _positive(value: int | None, flag: str) -> None:
    """UserError unless ``value`` is None or >= 1."""
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def check_out_file(path: str | None) -> None:
    """UserError unless ``--out FILE.json`` could be written: not a directory, in a writable place."""
    from trainers.runs.outdir import check_output_dir

    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; give a file name such as results.json")
    check_output_dir(out.parent)


def check_judge_spelling(judge: str | None, reward: str | None) -> None:
    """UserError for a judge that is not ``rm``, ``rm:DIR`` or ``gold``, or a reward model given twice."""
    if judge is not None and judge not in ("gold", "rm") and not (judge.startswith("rm:") and len(judge) > 3):
        raise UserError(f"unknown judge {judge!r}; {JUDGE_HINT}")
    if reward is not None and judge is not None and judge.startswith("rm:"):
        raise UserError("give the reward model once: --reward DIR or --judge rm:DIR")


def choose_judge(judge: str | None, reward: str | None, config_reward: str | None) -> str:
    """The judge of the win rate as :func:`trainers.evaluation.judges.make_judge` reads it.

    ``gold`` only when asked for by name; otherwise the reward model (``--judge rm:DIR``, else
    ``--reward DIR``, else the config's ``reward.path``). No reward model and no ``--judge gold``: a
    UserError saying what to pass (the world's rule means nothing on other prompts, so it is no default).
    """
    if judge == "gold":
        return "gold"
    if judge is not None and judge.startswith("rm:"):
        return judge
    path = reward or config_reward
    if not path:
        raise UserError(
            "the win rate needs a judge: give --reward DIR (a reward model, e.g. the output of `rlhf rm`) or "
            "--judge gold (the synthetic world's rule, for its prompts only)"
        )
    return f"rm:{path}"


def judge_source(judge: str | None, reward: str | None) -> str:
    """Where the judge's reward model came from, for messages: ``--judge``, ``--reward`` or the config."""
    if judge is not None and judge.startswith("rm:"):
        return "--judge reward model"
    return "--reward" if reward else "reward.path"


def check_plain_args(args: argparse.Namespace) -> None:
    """The checks that read no file: counts, the judge's spelling, which parts were asked for, --out.

    They run before :mod:`trainers.evaluation` (and torch) is imported, so these mistakes cost no wait.
    """
    check_out_file(args.out)
    _positive(args.n, "--n")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.batch_size, "--batch-size")
    if (args.baseline or args.prompts) and not (args.baseline and args.prompts):
        raise UserError("a win rate needs both --baseline DIR and --prompts FILE")
    check_judge_spelling(args.judge, args.reward)
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not (args.baseline or args.heldout_cluster or args.pretrain_file):
        raise UserError(
            "nothing to evaluate: give --baseline and --prompts, --heldout-cluster, or --pretrain-file"
        )


def check_args(args: argparse.Namespace, cfg) -> dict:
    """Validate every input before any model is loaded; return the resolved plan of what to run."""
    check_plain_args(args)
    from trainers.evaluation import generation, heldout, lm_loss

    plan: dict = {"policy": generation.resolve_model_dir(args.policy, what="--policy")}
    if args.baseline:
        plan["baseline"] = generation.resolve_model_dir(args.baseline, what="--baseline")
        plan["prompts"] = generation.read_prompts(args.prompts, args.n)
        plan["judge"] = choose_judge(args.judge, args.reward, cfg.reward.path)
        if plan["judge"] != "gold":
            generation.resolve_model_dir(plan["judge"][3:], what=judge_source(args.judge, args.reward))
        temperature = cfg.rollout.temperature if args.temperature is None else args.temperature
        plan["sampling"] = {
            "max_new_tokens": args.max_new_tokens or cfg.rollout.max_new_tokens,
            "temperature": temperature,
            "seed": args.seed,
        }
    if args.heldout_cluster:
        data = args.heldout_file or args.data_dir or cfg.data.dir
        if not data:
            raise UserError("--heldout-cluster needs --data-dir DIR, --heldout-file FILE or data.dir=DIR")
        plan["heldout"] = (args.heldout_cluster, heldout.heldout_file(data))
        heldout.load_heldout(args.heldout_cluster, plan["heldout"][1])  # unknown cluster / bad rows fail here
    if args.pretrain_file:
        plan["pretrain_texts"] = lm_loss.read_texts(args.pretrain_file)
    return plan


def run_win_rate(args: argparse.Namespace, plan: dict) -> dict:
    """Generate with both models on the same prompts and seed, judge, print the win rate."""
    from trainers.evaluation import generation, judges

    prompts, sampling = plan["prompts"], plan["sampling"]
    kwargs = {"batch_size": args.batch_size, "backend": args.backend, **sampling}
    policy = generation.generate(plan["policy"], prompts, **kwargs)
    baseline = generation.generate(plan["baseline"], prompts, **kwargs)
    judge = judges.make_judge(plan["judge"], batch_size=args.batch_size)
    result = judges.win_rate(prompts, policy, baseline, judge)
    print(
        f"win rate of {plan['policy']} over {plan['baseline']} (judge {judge.name}, n={result['n']}, "
        f"T={sampling['temperature']:g}): {result['win_rate']:.3f} "
        f"[95% CI {result['ci_low']:.3f}, {result['ci_high']:.3f}] "
        f"(wins {result['wins']}, ties {result['ties']}, losses {result['losses']})"
    )
    out = {"win_rate": result, "judge": judge.name, "sampling": sampling}
    if judge.name == "gold":
        out["gold"] = {
            "policy": judges.gold_scores(prompts, policy),
            "baseline": judges.gold_scores(prompts, baseline),
        }
        print(
            f"mean gold score: policy {out['gold']['policy']['score']:.3f}, baseline {out['gold']['baseline']['score']:.3f}"
        )
    out["examples"] = [
        {"prompt": p, "policy": a, "baseline": b} for p, a, b in list(zip(prompts, policy, baseline))[:5]
    ]
    return out


def run_eval(args: argparse.Namespace) -> int:
    """``rlhf eval``: check everything, then run each requested part and print one line per result."""
    from trainers.config import load_config
    from trainers.evaluation import heldout, lm_loss

    cfg = load_config(args.config, args.overrides)
    plan = check_args(args, cfg)
    results: dict = {"policy": str(plan["policy"])}
    if "baseline" in plan:
        results |= run_win_rate(args, plan)
        results["baseline"] = str(plan["baseline"])
    if "heldout" in plan:
        cluster, path = plan["heldout"]
        acc = heldout.heldout_accuracy(
            plan["policy"], cluster, path, method=args.method, batch_size=args.batch_size
        )
        tasks = ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in acc["per_task"].items())
        head = f"held-out '{cluster}' accuracy ({args.method}, n={acc['n']}): {acc['accuracy']:.3f}"
        print(f"{head} (chance {acc['chance']:.3f}; {tasks})")
        results["heldout"] = acc
    if "pretrain_texts" in plan:
        loss = lm_loss.pretrain_loss(plan["policy"], plan["pretrain_texts"], max_len=cfg.model.max_len)
        print(f"pretraining loss on {args.pretrain_file}: {loss:.4f}")
        results["pretrain_loss"] = loss
    if args.out:
        from trainers.files import atomic_write_json

        atomic_write_json(Path(args.out), results)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the top-level ``rlhf`` CLI."""
    p = sub.add_parser("eval", help=_HELP, description=_HELP)
    add_config_args(p)
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
