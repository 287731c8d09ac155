"""The one-process reference of ``iteration.py``: the same PPO-ptx iteration in plain torch, no Ray, no DeepSpeed.

Given what our iteration did (its engine calls, its experience and its training plan, captured while it
ran), this module times in one process:

- **generation**: vLLM in this process (:class:`actors.rollout.RolloutEngine` used as a plain object: the
  same ``LLM`` settings, the same prompts, sampling settings and request seeds as our engine got);
- **the four passes**: old log-probs (policy), reference log-probs, RM scores, critic values, micro-batched
  as the actors do (``ppo.micro_batch_size``), no grad;
- **advantages**: the driver's own :func:`trainers.ppo.experience.compute_advantages`;
- **training**: the same optimizer steps as our plan, policy (PPO clip + ptx LM loss, the stats the actor
  keeps) then critic (clipped value loss), every micro-batch of every rank of a step in this process,
  torch AdamW with the actors' betas/eps, gradient clipping as configured;
- **a plain copy of the weight bytes** the sync moves (every parameter copied once into a preallocated
  buffer): the memory-bandwidth limit of a weight sync.

The losses are ``trainers.algos``' (the actors' maths); the models are the transformers classes the actors
build, unwrapped. Threads: ``torch.set_num_threads`` to the machine's cores (one process may use them all,
which is what our actors share).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from trainers.algos import (
    entropy_from_logits,
    lm_loss,
    logprobs_from_logits,
    loss_normaliser,
    policy_loss,
    shift_for_lm,
    value_loss,
)
from trainers.ppo.experience import ExperiencePasses, compute_advantages
from trainers.runtime.models import (
    build_causal_lm,
    build_value_model,
    forward_logits,
    reward_scores,
    token_values,
)
from trainers.runtime.zero import ADAM_BETAS, ADAM_EPS, param_groups

set_threads = torch.set_num_threads
"""torch's own: vLLM's CPU worker replaces ``torch.set_num_threads`` in its process with a function that
only warns once it has bound its threads, and the in-process engine starts after this import."""


@dataclass
class Captured:
    """What one iteration of ours did, for the reference to repeat: the engine call(s) of the generate
    phase, the experience the training actors got and the training plan."""

    calls: list[tuple[list[list[int]], dict, int]]
    """``(prompt token ids, sampling dict, seed)`` of every engine ``generate`` call."""
    experience: object
    plan: object
    kl_coef: float


def response_logprobs(model, tokens, temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs (m, R), response logits (m, R, V))``: what ``ModelWorker._response_logprobs`` computes."""
    r_len = tokens.response_len
    logits = forward_logits(model, tokens.sequences, tokens.attention_mask)  # (m, L, V)
    resp_logits = logits[:, -r_len - 1 : -1]  # (m, R, V)
    labels = tokens.sequences[:, -r_len:]  # (m, R)
    return logprobs_from_logits(resp_logits, labels, temperature, chunk_size=chunk), resp_logits


class Reference:
    """The four models of a PPO iteration as plain torch modules in this process, with the two optimizers."""

    def __init__(self, cfg, threads: int):
        set_threads(threads)
        p = cfg.ppo
        self.p, self.temperature, self.chunk = p, cfg.rollout.temperature, p.logprob_chunk_size
        self.policy = build_causal_lm(path=cfg.model.path, seed=p.seed).eval()
        self.reference = build_causal_lm(path=cfg.model.path, seed=p.seed).eval().requires_grad_(False)
        self.reward = build_value_model(cfg.reward.path).eval().requires_grad_(False)
        self.critic = build_value_model(cfg.reward.path).eval()
        self.policy_opt = torch.optim.AdamW(
            param_groups(self.policy, p.weight_decay), lr=p.policy_lr, betas=ADAM_BETAS, eps=ADAM_EPS
        )
        self.critic_opt = torch.optim.AdamW(
            param_groups(self.critic, p.weight_decay), lr=p.critic_lr, betas=ADAM_BETAS, eps=ADAM_EPS
        )

    # --- passes ------------------------------------------------------------------------------------

    @torch.no_grad()
    def passes(self, tokens) -> ExperiencePasses:
        """Old log-probs, reference log-probs, RM scores and values of ``tokens``, micro-batched as the actors."""
        outs: dict[str, list[torch.Tensor]] = {"old": [], "ref": [], "rm": [], "values": []}
        for mb in tokens.micro_batches(self.p.micro_batch_size):
            mask = mb.response_mask.bool()
            for name, model in (("old", self.policy), ("ref", self.reference)):
                logp, _ = response_logprobs(model, mb, self.temperature, self.chunk)
                outs[name].append(torch.where(mask, logp, torch.zeros(())))
            outs["rm"].append(reward_scores(self.reward, mb.sequences, mb.attention_mask).float())
            v = token_values(self.critic, mb.sequences, mb.attention_mask)[:, -mb.response_len - 1 : -1]
            outs["values"].append(torch.where(mask, v.float(), torch.zeros(())))
        cat = {k: torch.cat(v)[: len(tokens)] for k, v in outs.items()}
        return ExperiencePasses(cat["old"], cat["ref"], cat["rm"], cat["values"], {"rm": cat["rm"]})

    def advantages(self, tokens, passes: ExperiencePasses, kl_coef: float):
        p = self.p
        return compute_advantages(
            tokens.response_mask, passes, kl_coef, p.kl_estimator, p.gamma, p.lam, estimator=p.advantage
        )

    # --- training ----------------------------------------------------------------------------------

    def _step(self, model, opt) -> None:
        if self.p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_policy(self, experience, plan, ranks: int | None = None) -> None:
        """Every policy optimizer step of ``plan`` (all ranks' micro-batches of a step here, world size 1;
        ``ranks``: only the first ``ranks`` ranks' micro-batches)."""
        p = self.p
        for k in range(len(plan.minibatches)):
            steps = [rank.steps[k] for rank in plan.policy[:ranks]]
            sp = steps[0]
            norm = loss_normaliser(max(sp.denominator, 1), 1)
            ptx_norm = loss_normaliser(max(sp.ptx_tokens, 1), 1) if sp.ptx is not None else 1.0
            for step in steps:
                slots = step.ptx if step.ptx is not None else [None] * len(step.micro_batches)
                for idx, ptx in zip(step.micro_batches, slots, strict=True):
                    mb = experience.rows(idx)
                    mask = mb.tokens.response_mask
                    logp, logits = response_logprobs(self.policy, mb.tokens, self.temperature, self.chunk)
                    loss, _ = policy_loss(
                        logp, mb.old_logprobs, mb.advantages, mask, p.clip_eps, num_tokens=norm,
                        clip_eps_high=p.clip_eps_high,
                    )  # fmt: skip
                    if ptx is not None:
                        ptx_logits = forward_logits(self.policy, ptx.input_ids, ptx.attention_mask)
                        ptx_loss = lm_loss(*shift_for_lm(ptx_logits, ptx.labels), num_tokens=ptx_norm)
                        loss = loss + p.ptx_coef * ptx_loss
                    loss.backward()
                    with torch.no_grad():  # the stats the actor keeps per micro-batch
                        entropy_from_logits(logits.detach(), self.temperature, chunk_size=self.chunk)
                        float(loss)
            self._step(self.policy, self.policy_opt)

    def train_critic(self, experience, plan) -> None:
        """Every critic optimizer step of ``plan``."""
        for k in range(len(plan.minibatches)):
            steps = [rank.steps[k] for rank in plan.critic]
            norm = loss_normaliser(max(steps[0].tokens, 1), 1)
            for step in steps:
                for idx in step.micro_batches:
                    mb = experience.rows(idx)
                    t = mb.tokens
                    v = token_values(self.critic, t.sequences, t.attention_mask)[:, -t.response_len - 1 : -1]
                    loss, _ = value_loss(v.float(), mb.values, mb.returns, t.response_mask, self.p.value_clip_eps,
                                         num_tokens=norm)  # fmt: skip
                    loss.backward()
            self._step(self.critic, self.critic_opt)

    def copy_weights(self) -> tuple[int, float]:
        """``(bytes, seconds)`` of one plain copy of every policy parameter into a preallocated buffer."""
        # every name, tied ones twice: what the sync sends (``ModelWorker.named_full_params``)
        params = [p.detach() for _, p in self.policy.named_parameters(remove_duplicate=False)]
        dst = [torch.empty_like(p) for p in params]
        clock = time.perf_counter()
        for d, s in zip(dst, params, strict=True):
            d.copy_(s)
        return sum(p.numel() * p.element_size() for p in params), time.perf_counter() - clock


def time_generation(engine, calls: Sequence[tuple[list[list[int]], dict, int]]) -> tuple[float, int]:
    """``(seconds, new tokens)`` of the engine calls of one generate phase, in this process."""
    clock, tokens = time.perf_counter(), 0
    for prompts, sampling, seed in calls:
        tokens += sum(len(s["token_ids"]) for s in engine.generate(prompts, sampling, seed))
    return time.perf_counter() - clock, tokens


def reference_iteration(ref: Reference, cap: Captured, engine, threads: int) -> dict[str, float]:
    """The one-process iteration of one captured iteration of ours: per-phase seconds and token counts.

    ``engine``: an in-process :class:`actors.rollout.RolloutEngine`; ``threads``: torch threads here."""
    set_threads(threads)
    row: dict[str, float] = {"threads": torch.get_num_threads(), "cpus_usable": len(os.sched_getaffinity(0))}
    row["generate"], row["gen_tokens"] = time_generation(engine, cap.calls)
    tokens = cap.experience.tokens
    clock = time.perf_counter()
    passes = ref.passes(tokens)
    row["passes"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ref.advantages(tokens, passes, cap.kl_coef)
    row["advantages"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ref.train_policy(cap.experience, cap.plan)
    row["train_policy"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if cap.plan.critic:
        ref.train_critic(cap.experience, cap.plan)
    row["train_critic"] = time.perf_counter() - clock
    row["sync_bytes"], row["copy"] = ref.copy_weights()
    row["experience"] = row["passes"] + row["advantages"]
    row["train"] = row["train_policy"] + row["train_critic"]
    row["iteration"] = row["generate"] + row["experience"] + row["train"] + row["copy"]
    return row | layout_bound(ref, cap, threads)


def layout_bound(ref: Reference, cap: Captured, threads: int) -> dict[str, float]:
    """What our actor layout could reach on this machine with no framework cost: one policy rank's share
    (its micro-batches) and the critic's, each timed here in plain torch on one thread (as each actor
    has), and the train phase they bound: the slower of the two, or, when the ranks outnumber the cores,
    their total work spread over the cores (``threads``)."""
    set_threads(1)
    clock = time.perf_counter()
    ref.train_policy(cap.experience, cap.plan, ranks=1)
    rank = time.perf_counter() - clock
    clock = time.perf_counter()
    if cap.plan.critic:
        ref.train_critic(cap.experience, cap.plan)
    critic = time.perf_counter() - clock
    set_threads(threads)
    workers = len(cap.plan.policy)
    total = workers * rank + critic
    bound = max(rank, critic, total / threads)
    return {"policy_rank_1thread": rank, "critic_1thread": critic, "train_layout_bound": bound}


def train_tokens(experience, plan) -> int:
    """Tokens (attention mask) the policy's forward/backward passes of one train phase see: every
    micro-batch of every step (rollout rows, once per epoch) and the ptx micro-batches."""
    total = 0
    for rank in plan.policy:
        for step in rank.steps:
            for idx in step.micro_batches:
                total += int(experience.tokens.attention_mask[idx].sum())
            for ptx in step.ptx or []:
                total += int(ptx.attention_mask.sum()) if ptx is not None else 0
    return total


def medians(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The per-key median over rows."""
    import statistics

    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}
