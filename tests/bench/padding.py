"""Padding and training throughput of PPO micro-batches (issue 17): fixed ``ppo.micro_batch_size`` against
``ppo.micro_batch_tokens``, side by side, on one rollout-shaped batch with skewed lengths.

    python tests/bench/padding.py                                   # writes tests/bench/results/padding_cpu.json
    python tests/bench/padding.py --preset tiny --rows 32 --repeats 1 --json /tmp/p.json      # a smoke run

What runs: one optimizer step's worth of PPO rows (``--rows`` sequences, prompts uniform in
[``PROMPT_MIN``, ``PROMPT_MAX``] tokens, responses log-normal capped at ``--max-new-tokens``: most short, a
few at the cap, as sampled responses are) split over ``--world`` ranks by the driver's own plan
(``trainers.ppo.schedule.rank_micro_batches``), then every micro-batch of every rank run here in one process:
forward, the PPO clipped loss with the global ``sum / (N / W)`` normaliser, backward -- what a policy rank
does per micro-batch, without DeepSpeed or Ray. Layouts:

- ``fixed``: today's default: ``--micro-batch-size`` rows per micro-batch, each as wide as the batch
  (``P+R``, the longest prompt plus the longest response of the whole batch).
- ``fixed_trimmed``: the same micro-batches, each cut to its real columns (what trimming alone gives,
  without grouping by length; not an option of the trainer, a reference point).
- ``tokens``: ``ppo.micro_batch_tokens`` = ``--micro-batch-size x (P+R)``, the fixed layout's slots per
  micro-batch (so the peak activation memory per forward is no larger); rows grouped by length, the
  micro-batch cut to its real columns (``Experience.trimmed``), equal counts over the ranks.

Measured: padding fraction (padding / computed token slots, ``trainers.ppo.schedule.padding_metrics``),
micro-batches per rank per step, real tokens per second of forward + backward (median of ``--repeats``
after one warm-up, the layouts interleaved), and the largest difference between a layout's gradient and
the fixed one's (the invariance of docs/ppo_details.md item 24: fp32 rounding only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.bench import _bench_runs as bench  # noqa: E402
from trainers.algos import logprobs_from_logits, loss_normaliser, policy_loss  # noqa: E402
from trainers.ppo import schedule  # noqa: E402
from trainers.ppo.batch import Experience, build_rollout_batch  # noqa: E402
from trainers.runtime.models import forward_logits  # noqa: E402
from trainers.runtime.presets import build_config  # noqa: E402

TAG = "padding"
DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "padding_cpu.json"
PROMPT_MIN, PROMPT_MAX = 8, 48
"""Prompt lengths in tokens (uniform)."""
VOCAB = 1024


def skewed_batch(rows: int, max_new: int, seed: int) -> Experience:
    """``rows`` PPO rows: uniform prompts, log-normal responses (median max_new/8, sigma 1) capped at ``max_new``;
    random old log-probs and advantages on the real tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(rows):
        p = int(torch.randint(PROMPT_MIN, PROMPT_MAX + 1, (1,), generator=g))
        r = int(min(max_new, max(1, torch.exp(torch.randn(1, generator=g)).item() * max_new / 8)))
        prompts.append(torch.randint(3, VOCAB, (p,), generator=g).tolist())
        responses.append(torch.randint(3, VOCAB, (r,), generator=g).tolist())
    tokens = build_rollout_batch(prompts, responses, 0, (2,)).tokens
    mask = tokens.response_mask.float()
    old = (-5.0 + 0.3 * torch.randn(mask.shape, generator=g)) * mask
    return Experience(tokens, old, torch.randn(mask.shape, generator=g) * mask)


def run_step(model, exp: Experience, micros: list[list[torch.Tensor]], trim: bool) -> float:
    """Forward + PPO loss + backward of every micro-batch of every rank (``micros[rank]``); seconds."""
    model.zero_grad(set_to_none=False)
    world, n = len(micros), float(exp.tokens.response_mask.sum())
    norm = loss_normaliser(n, world)
    start = time.perf_counter()
    for rank_micros in micros:
        for idx in rank_micros:
            mb = exp.rows(idx)
            mb = mb.trimmed() if trim else mb
            r = mb.tokens.response_len
            logits = forward_logits(model, mb.tokens.sequences, mb.tokens.attention_mask)[:, -r - 1 : -1]
            logp = logprobs_from_logits(logits, mb.tokens.sequences[:, -r:], 1.0)  # (m, R)
            loss, _ = policy_loss(
                logp, mb.old_logprobs, mb.advantages, mb.tokens.response_mask, num_tokens=norm
            )
            (loss / world).backward()  # the ranks' gradients averaged, as DeepSpeed does
    return time.perf_counter() - start


def measure(args) -> dict:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config(args.preset, VOCAB)).eval()  # dropout off, as PPO runs
    exp = skewed_batch(args.rows, args.max_new_tokens, args.seed)
    lengths = exp.tokens.row_lengths()
    width = exp.tokens.sequences.shape[1]
    budget = args.micro_batch_size * width
    steps = [torch.randperm(args.rows, generator=torch.Generator().manual_seed(args.seed))]
    layouts = {
        "fixed": (schedule.rank_micro_batches(steps, args.world, args.micro_batch_size), False),
        "fixed_trimmed": (schedule.rank_micro_batches(steps, args.world, args.micro_batch_size), True),
        "tokens": (schedule.rank_micro_batches(steps, args.world, 0, budget, lengths), True),
    }
    real = sum(p + r for p, r in lengths)
    per_rank = {name: [rank[0] for rank in micros] for name, (micros, _) in layouts.items()}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    grads = {}
    for name, (_, trim) in layouts.items():  # warm-up, and each layout's gradient
        run_step(model, exp, per_rank[name], trim)
        grads[name] = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
        for name, (_, trim) in layouts.items():
            times[name].append(run_step(model, exp, per_rank[name], trim))
    out = {}
    for name, (micros, trim) in layouts.items():
        plan = [schedule.RankPlan(1, [schedule.StepPlan(rank[0], tokens=0)]) for rank in micros]
        layout = schedule.padding_metrics(plan, exp.tokens, trimmed=trim)
        seconds = statistics.median(times[name])
        out[name] = {
            "padding_fraction": round(layout["padding_fraction"], 4),
            "micro_batches_per_rank": layout["micro_batches"],
            "micro_batch_rows": [[len(m) for m in rank] for rank in per_rank[name]],
            "computed_slots": round(real / (1 - layout["padding_fraction"])),
            "seconds_median": round(seconds, 3),
            "seconds_all": [round(t, 3) for t in times[name]],
            "real_tokens_per_s": round(real / seconds, 1),
        }
        print(f"{TAG}: {name}: padding {layout['padding_fraction']:.1%}, {layout['micro_batches']:g} micro-batches"
              f"/rank, {real / seconds:,.0f} real tokens/s", flush=True)  # fmt: skip
    diff = max(float((grads[name] - grads["fixed"]).abs().max()) for name in grads)
    scale = float(grads["fixed"].abs().max())
    return {
        "batch": {
            "rows": args.rows,
            "world": args.world,
            "width_P_plus_R": width,
            "real_tokens": real,
            "prompt_lengths": [PROMPT_MIN, PROMPT_MAX],
            "response_lengths": {
                "min": min(r for _, r in lengths),
                "median": statistics.median(r for _, r in lengths),
                "max": max(r for _, r in lengths),
            },
        },
        "micro_batch_size": args.micro_batch_size,
        "micro_batch_tokens": budget,
        "layouts": out,
        "speedup_tokens_over_fixed": round(
            out["fixed"]["seconds_median"] / out["tokens"]["seconds_median"], 2
        ),
        "grad_max_abs_diff": diff,
        "grad_max_abs": scale,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rows", type=int, default=64, help="PPO rows in the step (all ranks)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    started = time.time()
    code = bench.code_identity()
    env = bench.environment(started, code)
    result = {
        "experiment": "PPO micro-batches: fixed micro_batch_size vs micro_batch_tokens (issue 17)",
        "command": "python tests/bench/padding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"preset": args.preset, "dtype": "float32", "threads": args.threads},
        **measure(args),
        "environment": env,
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{TAG}: wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
