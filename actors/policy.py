"""The policy actor: one rank of the ZeRO-3 policy (initialised from the SFT model).

    logprobs(shard)                                   old log-probs, no grad, by the trained model
    train(experience, plan)                           PPO clip + ptx_coef x LM loss, one step per minibatch
    sync_weights(engines, epoch)                      gathered weights -> every vLLM engine
    save_state(dir) / load_state(dir) / save_model(dir)

Loss aggregation (docs/ppo_details.md item 24): the driver sends, for every optimizer step, the global number
of response tokens N (and of ptx label tokens N_ptx) over all ranks and micro-batches. Each micro-batch's loss
is ``sum / (N / W)`` (``trainers.algos.loss_normaliser``) and goes through ``model.backward(loss,
scale_wrt_gas=False)``: DeepSpeed averages gradients over the W ranks and, with ``scale_wrt_gas=False``, does
not divide by the accumulation steps, so the optimizer sees the gradient of the token mean over the whole
minibatch whatever the split. The ptx term is a second token mean over the step's pretraining tokens, added to
the same micro-batch loss, so both terms land in the same optimizer step (docs/ppo_details.md item 20).
"""

from __future__ import annotations

from collections import defaultdict

import ray
import torch

from actors.base import TrainableWorker
from actors.specs import TrainSpec
from cluster.weight_sync import make_sync
from trainers.algos import (
    agg_weights,
    entropy_from_logits,
    kl_loss,
    lm_loss,
    loss_normaliser,
    masked_sum,
    policy_loss,
    shift_for_lm,
)
from trainers.data.tokenizer import load_tokenizer
from trainers.ppo.batch import Experience, PtxBatch
from trainers.ppo.schedule import RankPlan
from trainers.runtime.device import torch_dtype
from trainers.runtime.export import save_hf
from trainers.runtime.models import build_causal_lm, forward_logits, no_dropout_updates


class PolicyWorker(TrainableWorker):
    """Policy rank: a causal LM trained with the PPO clipped objective plus the ptx LM loss."""

    spec: TrainSpec
    fault_role = "policy"

    def _load_model(self) -> torch.nn.Module:
        return build_causal_lm(
            path=self.spec.model_path,
            dropout=0.0,
            dtype=torch_dtype(self.spec.dtype),
            seed=self.spec.seed,
            trust_remote_code=self.spec.trust_remote_code,
        )

    def _ptx_loss(self, ptx: PtxBatch, num_tokens: float) -> torch.Tensor:
        """LM loss on a pretraining micro-batch as ``sum / num_tokens`` (temperature 1: data likelihood)."""
        ptx = ptx.to(self.device)
        logits = forward_logits(self.model, ptx.input_ids, ptx.attention_mask)  # (b, T, V)
        return lm_loss(
            *shift_for_lm(logits, ptx.labels), num_tokens=num_tokens, chunk_size=self.spec.logprob_chunk_size
        )

    def _micro_step(
        self,
        mb: Experience,
        ptx: PtxBatch | None,
        norm: float,
        ptx_norm: float,
        acc: dict[str, float],
        guard,
        last: bool,
        inject_nan: bool = False,
    ) -> None:
        """Forward + backward of one micro-batch through ``guard`` (``last``: the step's final one);
        adds its stat sums to ``acc``."""
        mask = mb.tokens.response_mask
        spec = self.spec
        logp, resp_logits = self._response_logprobs(mb.tokens)  # (m, R), (m, R, V)
        weights = None if spec.loss_agg == "token_mean" else agg_weights(mask, spec.loss_agg)  # (m, R)
        loss, st = policy_loss(
            logp,
            mb.old_logprobs,
            mb.advantages,
            mask,
            spec.clip_eps,
            num_tokens=norm,
            clip_eps_high=spec.clip_eps_high,
            weights=weights,
        )
        loss = self._poisoned(loss, inject_nan)
        total = loss
        if spec.kl_loss_coef > 0:
            kl, _ = kl_loss(
                logp, mb.ref_logprobs, mask, spec.kl_loss_estimator, num_tokens=norm, weights=weights
            )
            total = total + spec.kl_loss_coef * kl
            acc["kl_loss_sum"] += float(kl.detach()) * norm
        if ptx is not None:
            ptx_loss = self._ptx_loss(ptx, ptx_norm)
            total = total + spec.ptx_coef * ptx_loss
            acc["ptx_sum"] += float(ptx_loss.detach()) * ptx_norm
        guard.backward_step(total, last)
        with torch.no_grad():
            n = float(st["tokens"])
            log_ratio = torch.where(
                mask.bool(), logp.detach() - mb.old_logprobs, torch.zeros((), device=logp.device)
            )
            entropy = entropy_from_logits(
                resp_logits.detach(), spec.temperature, chunk_size=spec.logprob_chunk_size
            )  # (m, R)
            acc["tokens"] += n
            acc["loss_sum"] += float(loss.detach()) * norm
            acc["clip_sum"] += float(st["clipfrac"]) * n
            acc["approx_kl_sum"] += float(st["approx_kl"]) * n
            acc["ratio_sum"] += float(st["ratio_mean"]) * n
            acc["ratio_sq_sum"] += float(st["ratio_std"] ** 2 + st["ratio_mean"] ** 2) * n
            acc["entropy_sum"] += float(masked_sum(entropy, mask))
            acc["max_abs_log_ratio"] = max(acc["max_abs_log_ratio"], float(log_ratio.abs().max()))

    def train(self, experience: Experience, plan: RankPlan) -> list[dict[str, float]]:
        """Run every optimizer step of this iteration; returns per-step stat sums of this rank.

        ``experience``: the whole batch (N rows; the policy reads the tokens, ``old_logprobs`` and
        ``advantages``). ``plan.steps[k]``: this rank's micro-batches (row indices), the step's global
        token counts (see the module docstring) and, with ptx, one pretraining micro-batch or None per
        micro-batch. A step with a non-finite loss or gradient norm is skipped on every rank; its stats
        carry ``skipped`` 1 (else 0) and its other sums are not meaningful. Tests make chosen steps
        non-finite through ``RLHF_FAULT_NONFINITE_STEPS`` (run-wide step ``plan.first_step + k``).
        """
        out = []
        for step, sp in enumerate(plan.steps):
            micros = sp.micro_batches
            self._check_plan(micros)
            acc: dict[str, float] = defaultdict(float)
            acc["max_abs_log_ratio"] = 0.0
            norm = loss_normaliser(max(sp.denominator, 1), self.world_size)
            ptx_norm = loss_normaliser(max(sp.ptx_tokens, 1), self.world_size) if sp.ptx is not None else 1.0
            slots = sp.ptx if sp.ptx is not None else [None] * len(micros)
            guard = self._step_guard()
            for i, (idx, slot) in enumerate(zip(micros, slots, strict=True)):
                last, poison = i == len(micros) - 1, i == 0 and self._fault_at(plan.first_step + step)
                mb = self._micro_batch(experience, idx, last)
                self._micro_step(mb, slot, norm, ptx_norm, acc, guard, last, poison)
            acc["skipped"] = 0.0 if guard.applied else 1.0  # the same on every rank
            acc["max_grad_norm"] = self._grad_norm()  # the same on every rank
            out.append(dict(acc))
        return out

    # --- weights out --------------------------------------------------------------------------------

    def sync_weights(self, engines: list, engines_epoch: int = 0) -> dict | None:
        """Push the full current weights into every rollout engine (collective over the policy ranks:
        all take part in each parameter's gather; rank 0 sends, or every rank with CUDA IPC). Returns
        rank 0's transfer stats.

        The transport is the spec's ``weight_sync`` (``trainers.config.transport.choose_transport``), built at
        the first call. ``engines_epoch`` counts the engine restarts the driver saw: when it changed, a
        restarted engine has lost its broadcast group membership and the group is formed anew.
        """
        ipc = self.spec.weight_sync == "ipc"
        named = self.named_full_params(every_rank=ipc)
        if self.rank != 0 and not ipc:
            for _ in named:  # take part in every gather
                pass
            return None
        if getattr(self, "_sync", None) is None:
            self._sync = make_sync(
                self.spec.weight_sync,
                engines if self.rank == 0 else [],
                device=self.spec.device,
                master_addr=ray.util.get_node_ip_address(),
                tensor_parallel_size=self.spec.rollout_tensor_parallel_size,
            )
            self._sync_epoch = engines_epoch
        if engines_epoch != self._sync_epoch:
            self._sync.reset()
            self._sync_epoch = engines_epoch
        stats = self._sync.push(named)
        return {**stats, "transport": self.spec.weight_sync} if self.rank == 0 else None

    def save_model(self, out_dir: str) -> str | None:
        """The policy as a Hugging Face directory (safetensors + tokenizer, dropout 0) at ``out_dir``,
        written atomically by rank 0; collective."""
        tokenizer = load_tokenizer(self.spec.tokenizer_path) if self.spec.tokenizer_path else None
        module = self.model.module
        path = save_hf(self.model, tokenizer, out_dir, config_updates=no_dropout_updates(module.config))
        return None if path is None else str(path)
