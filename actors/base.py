"""What the DeepSpeed-backed PPO actors (policy, critic, reference, reward) share.

Each actor is one rank of its role's torch.distributed world (``cluster.actor_group``): the driver
creates the group, forms the world, then calls :meth:`ModelWorker.build` on every rank, which loads
the model (ZeRO-3 partitioned when ``zero_stage == 3``) and wraps it in DeepSpeed: ``self.model`` is
the DeepSpeed-wrapped model (DeepSpeed's ``DeepSpeedEngine``; "engine" in this project means a vLLM
engine only), ``self.model.module`` the transformers model inside it.

Conventions every actor follows:

- A *shard* is a :class:`trainers.ppo.batch.TokenBatch` of CPU tensors: ``sequences``/``attention_mask``
  ``(n, P+R)`` (left-padded prompt, right-padded response) and ``response_mask`` ``(n, R)``. Response token
  t sits at column ``P+t``; the logits (or value) for it are read at column ``P+t-1``
  (:func:`response_slice`). Training takes an :class:`trainers.ppo.batch.Experience` and this rank's
  :class:`trainers.ppo.schedule.RankPlan`.
- ZeRO-3 ranks forward in lock-step; the driver gives every rank the same number of rows, and each
  rank cuts them into the same number of micro-batches.
- Dropout is off and every module stays in eval mode for the whole run (docs/ppo_details.md item 22), except
  that with ``model.gradient_checkpointing`` the checkpointing layers (not their submodules) are marked
  training so transformers recomputes them (``trainers.runtime.models.prepare_for_training``).
- Results go back as CPU tensors; all maths on them happens in the driver (``trainers.algos``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from actors.specs import ModelSpec, TrainSpec
from cluster.actor_group import DistributedWorker
from cluster.faults import injector
from trainers.algos import logprobs_from_logits
from trainers.data.packing import pack, split_to
from trainers.ppo.batch import Experience, TokenBatch
from trainers.runtime.device import disable_cudnn_attention
from trainers.runtime.dist import all_reduce_max, all_reduce_sum, init_distributed
from trainers.runtime.models import forward_logits, prepare_for_training
from trainers.runtime.step_guard import StepGuard
from trainers.runtime.zero import (
    CHECKPOINT_TAG,
    ds_config,
    gathered,
    hf_deepspeed_context,
    init_deepspeed,
    persists_whole,
)


def response_slice(per_position: torch.Tensor, r_len: int) -> torch.Tensor:
    """The outputs that belong to the ``r_len`` response tokens: ``(B, L, ...)`` -> ``(B, R, ...)``.

    Position ``L-R-1+t`` predicts response token ``t`` (column ``L-R+t``): causal LMs predict the next
    token, and the critic's value of token t is its estimate before taking that action.
    """
    return per_position[:, -r_len - 1 : -1]


class ModelWorker(DistributedWorker):
    """Base of the PPO actors: spec, device, DeepSpeed-wrapped model, micro-batched no-grad passes,
    checkpoints."""

    def __init__(self, spec: ModelSpec):
        torch.set_num_threads(spec.torch_threads)
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.device = torch.device("cuda" if spec.device == "cuda" else "cpu")
        self.model = None
        self._hf_ds = None  # keeps transformers' ZeRO-3 integration alive (it holds a weak reference)

    # --- construction ---------------------------------------------------------------------------

    def _ds_config(
        self, grad_accum: int = 1, grad_clip: float = 0.0, offload_optimizer: bool = False
    ) -> dict:
        return ds_config(
            self.spec.zero_stage,
            self.spec.dtype,
            self.spec.micro_batch_size,
            grad_accum,
            self.world_size,
            grad_clip,
            offload_params=self.spec.offload_params,
            offload_optimizer=offload_optimizer,
            pin_memory=self.device.type == "cuda",
            persist_params=persists_whole(self.spec.model_path),
        )

    def _load_model(self) -> torch.nn.Module:
        """Build the transformers model (subclasses); called while the ZeRO-3 context is alive."""
        raise NotImplementedError

    def _wrap_model(self, model: torch.nn.Module, config: dict):
        """Frozen roles: the model wrapped by DeepSpeed without optimizer (ZeRO-3 partitioned inference)."""
        import deepspeed  # here, not at the top: the driver imports the actor classes and needs no DeepSpeed

        wrapped, *_ = deepspeed.initialize(model=model, config=config)
        return wrapped

    def _role_ds_config(self) -> dict:
        return self._ds_config()

    def build(self) -> dict:
        """Load the model and wrap it in DeepSpeed; returns facts for the driver's log."""
        if self.device.type == "cuda":
            torch.cuda.set_device(0)
            disable_cudnn_attention()  # non-finite gradients with left padding (see its docstring)
        init_distributed(self.spec.device)
        config = self._role_ds_config()
        if self.spec.zero_stage == 3:
            self._hf_ds = hf_deepspeed_context(config)
        model = self._load_model()
        # Eval mode (dropout off, docs/ppo_details.md item 22), the checkpointing layers excepted; it stays
        # so: nothing calls train() or eval() again (DeepSpeed's wrapping does not either).
        checkpointed = prepare_for_training(model, self._gradient_checkpointing(), eval_mode=True)
        self.model = self._wrap_model(model, config)
        trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "parameters": trainable,
            "checkpointed_modules": checkpointed,
        }

    def _gradient_checkpointing(self) -> bool:
        """Frozen roles never run backward: nothing to recompute."""
        return False

    # --- passes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _map_micro(self, shard: TokenBatch, fn: Callable[[TokenBatch], torch.Tensor]) -> torch.Tensor:
        """``fn`` over micro-batches of ``shard`` (on this actor's device) without grad; results
        concatenated on the CPU. With ``micro_batch_tokens``: :meth:`_map_packed`."""
        if self.spec.micro_batch_tokens > 0:
            return self._map_packed(shard, fn)
        outs = [
            fn(mb.to(self.device)).float().cpu() for mb in shard.micro_batches(self.spec.micro_batch_size)
        ]
        return torch.cat(outs, dim=0)

    def _map_packed(self, shard: TokenBatch, fn: Callable[[TokenBatch], torch.Tensor]) -> torch.Tensor:
        """``fn`` over ``shard`` packed by the token budget, each micro-batch cut to its real columns
        (``TokenBatch.trimmed``); as many micro-batches as the rank of this group that packed to the
        most (one all-reduce: ZeRO-3's forward gathers are collectives). Results ``(n,)`` or ``(n, R)``
        in the shard's row order, 0 in the cut columns (padding, which ``fn`` zeroes anyway)."""
        lengths = shard.row_lengths()
        groups = pack(lengths, self.spec.micro_batch_tokens)
        count = int(all_reduce_max([float(len(groups))])[0])
        out: torch.Tensor | None = None
        for group in split_to(groups, count, lengths):
            idx = torch.tensor(group, dtype=torch.long)
            result = fn(shard.rows(idx).trimmed().to(self.device)).float().cpu()  # (m,) or (m, R')
            if out is None:
                out = torch.zeros((len(shard), *((shard.response_len,) if result.dim() == 2 else ())))
            if result.dim() == 2:
                out[idx, : result.shape[1]] = result
            else:
                out[idx] = result
        return out

    def _response_logprobs(self, mb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs (m, R), response logits (m, R, V))`` of the response tokens at the sampling temperature
        (docs/ppo_details.md item 3); padding entries hold garbage and must be masked by the caller."""
        r_len = mb.response_len
        logits = forward_logits(self.model, mb.sequences, mb.attention_mask)  # (m, L, V)
        resp_logits = response_slice(logits, r_len)  # (m, R, V)
        labels = mb.sequences[:, -r_len:]  # (m, R)
        logp = logprobs_from_logits(
            resp_logits, labels, self.spec.temperature, chunk_size=self.spec.logprob_chunk_size
        )
        return logp, resp_logits

    def logprobs(self, shard: TokenBatch) -> torch.Tensor:
        """``(n, R)`` log-probs of the response tokens, no grad, 0 on padding (docs/ppo_details.md item 3,
        5)."""

        def fn(mb: TokenBatch) -> torch.Tensor:
            logp, _ = self._response_logprobs(mb)
            return torch.where(mb.response_mask.bool(), logp, torch.zeros((), device=logp.device))

        return self._map_micro(shard, fn)

    # --- weights and state ------------------------------------------------------------------------

    def named_full_params(self, every_rank: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full CPU tensor)`` for every parameter, gathered one at a time.

        Collective under ZeRO-3: every rank must run through the whole iterator in the same order;
        only rank 0 gets the pairs (other ranks iterate to take part in each gather and get nothing).
        ``every_rank``: every rank gets each pair, as a copy on its own device (the CUDA-IPC weight sync).
        Tied parameters come once per name (``lm_head.weight`` and ``model.embed_tokens.weight``): vLLM's
        weight reload unties them, and an ``lm_head`` that receives nothing keeps its old values (seen:
        log-prob mismatch 1.6 after one perturbed update without the alias, 1e-6 with it).
        """
        module = self.model.module
        for name, param in module.named_parameters(remove_duplicate=False):
            with gathered([param]):
                if every_rank:
                    full = param.detach().clone()
                else:
                    full = param.detach().to("cpu", copy=True) if self.rank == 0 else None
            if full is not None:
                yield name, full

    def save_state(self, directory: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule) of this role; collective."""
        self.model.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, directory: str) -> None:
        """Restore :meth:`save_state`; collective."""
        path, _ = self.model.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' under {Path(directory)}")

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Every full parameter as a CPU tensor (collective; rank 0 gets them, other ranks ``{}``)."""
        return dict(self.named_full_params())


class TrainableWorker(ModelWorker):
    """An actor whose model also trains: AdamW at a constant LR, one optimizer step per minibatch."""

    spec: TrainSpec
    fault_role = ""
    """The role's name in ``RLHF_FAULT_NONFINITE_STEPS`` (``policy``, ``critic``)."""

    def _gradient_checkpointing(self) -> bool:
        return self.spec.gradient_checkpointing

    def _role_ds_config(self) -> dict:
        spec = self.spec
        return self._ds_config(spec.grad_accum, spec.grad_clip, offload_optimizer=spec.offload_optimizer)

    def _wrap_model(self, model: torch.nn.Module, config: dict):
        # PPO runs at a constant learning rate (min_lr_ratio 1, no warm-up), as InstructGPT's PPO did
        # within one run; the schedule object still lives in DeepSpeed's checkpoints.
        return init_deepspeed(
            model,
            config,
            lr=self.spec.lr,
            weight_decay=self.spec.weight_decay,
            total_steps=1,
            min_lr_ratio=1.0,
        )

    def _check_plan(self, micros: list[torch.Tensor]) -> None:
        """The driver's plan must match DeepSpeed's accumulation steps, or DeepSpeed would step at the
        wrong micro-batch. With ``micro_batch_tokens`` the count varies by step and the actor marks the
        boundary itself (:meth:`_micro_batch`); then every rank must have the same count, at least 1, or
        ZeRO-3's gathers would hang: checked with one all-reduce (count and its square summed: equal
        counts iff ``W x sum(n^2) == sum(n)^2``), so every rank fails alike."""
        if self.spec.micro_batch_tokens > 0:
            n = len(micros)
            total, squares = all_reduce_sum([float(n), float(n * n)])
            if self.world_size * squares != total * total or n < 1:
                raise ValueError(f"rank {self.rank} has {n} micro-batches, ranks hold {total:g} in all")
            return
        if len(micros) != self.spec.grad_accum:
            raise ValueError(
                f"plan has {len(micros)} micro-batches per step, DeepSpeed expects {self.spec.grad_accum}"
            )

    def _micro_batch(self, experience: Experience, idx: torch.Tensor, last: bool) -> Experience:
        """The rows ``idx`` of ``experience`` on this actor's device; with ``micro_batch_tokens`` cut to
        their real columns (``Experience.trimmed``), and ``last`` made DeepSpeed's accumulation boundary
        (set before the forward, as DeepSpeed asks)."""
        mb = experience.rows(idx)
        if self.spec.micro_batch_tokens > 0:
            mb = mb.trimmed()
            self.model.set_gradient_accumulation_boundary(last)
        return mb.to(self.device)

    def _grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step, before clipping (0.0 if unknown; inf for a
        step DeepSpeed skipped)."""
        norm = self.model.get_global_grad_norm()
        return 0.0 if norm is None else float(norm)

    def _step_guard(self):
        """A :class:`trainers.runtime.step_guard.StepGuard` for the next optimizer step (skips it, on every
        rank alike, if a loss or the gradient norm is non-finite)."""
        return StepGuard(self.model, scale_wrt_gas=False)

    def _fault_at(self, step: int) -> bool:
        """Fault injection for tests (``cluster/faults.py``): whether ``RLHF_FAULT_NONFINITE_STEPS`` names
        run-wide optimizer step ``step`` (1-based) of this role; never without the variable."""
        return injector().nonfinite(self.fault_role, step)

    def _poisoned(self, loss: torch.Tensor, poison: bool) -> torch.Tensor:
        """NaN added to rank 0's loss of a step chosen by :meth:`_fault_at`; the gradients stay finite, so
        only the all-ranks loss check can catch it."""
        return loss + float("nan") if poison and self.rank == 0 else loss
