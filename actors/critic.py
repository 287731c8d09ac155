"""The critic actor: one rank of the ZeRO-3 value model, initialised from the reward model.

    values(shard)                                (n, R) value of each response token, no grad
    train(experience, plan)                      clipped value loss, one optimizer step per minibatch
    save_state(dir) / load_state(dir)

The value model is the RM's class loaded from the RM directory (docs/ppo_details.md item 23): its scalar head
applied at every position plus the RM's ``reward_bias`` (``trainers.runtime.models.token_values``), so before
the first update the value at a sequence's last real token is the RM's normalised score (item 30). The
value of response token t is read at the position that predicts it (``actors.base.response_slice``).
Loss aggregation as for the policy (``actors/policy.py``): ``sum / (N / W)`` per micro-batch with
the step's global token count N, ``model.backward(loss, scale_wrt_gas=False)``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from actors.base import TrainableWorker, response_slice
from actors.specs import TrainSpec
from trainers.algos import loss_normaliser, value_loss
from trainers.ppo.batch import Experience, TokenBatch
from trainers.ppo.schedule import RankPlan
from trainers.runtime.device import torch_dtype
from trainers.runtime.models import build_value_model, token_values


class CriticWorker(TrainableWorker):
    """Critic rank: per-token values and the clipped value loss (docs/ppo_details.md item 19)."""

    spec: TrainSpec
    fault_role = "critic"

    def _load_model(self) -> torch.nn.Module:
        return build_value_model(
            self.spec.model_path,
            dtype=torch_dtype(self.spec.dtype),
            trust_remote_code=self.spec.trust_remote_code,
        )

    def _values(self, mb: TokenBatch) -> torch.Tensor:
        """``(m, R)`` values of the response tokens (padding entries are garbage; callers mask)."""
        per_position = token_values(self.model, mb.sequences, mb.attention_mask)  # (m, L)
        return response_slice(per_position, mb.response_len).float()  # (m, R)

    def values(self, shard: TokenBatch) -> torch.Tensor:
        """``(n, R)`` values, no grad, 0 on padding (docs/ppo_details.md item 12)."""

        def fn(mb: TokenBatch) -> torch.Tensor:
            v = self._values(mb)
            return torch.where(mb.response_mask.bool(), v, torch.zeros((), device=v.device))

        return self._map_micro(shard, fn)

    def train(self, experience: Experience, plan: RankPlan) -> list[dict[str, float]]:
        """Every optimizer step of this iteration; per-step stat sums of this rank.

        ``experience``: the whole batch (the critic reads the tokens, ``values`` -- the old values -- and
        ``returns``); ``plan.steps[k]``: this rank's micro-batches (row indices) and the step's global
        count of response tokens. A non-finite step is skipped on every rank and has ``skipped`` 1 in
        its stats (tests choose such steps through ``RLHF_FAULT_NONFINITE_STEPS``).
        """
        out = []
        for step, sp in enumerate(plan.steps):
            micros = sp.micro_batches
            self._check_plan(micros)
            norm = loss_normaliser(max(sp.tokens, 1), self.world_size)
            acc: dict[str, float] = defaultdict(float)
            guard = self._step_guard()
            for i, idx in enumerate(micros):
                mb = self._micro_batch(experience, idx, last=i == len(micros) - 1)
                loss, st = value_loss(
                    self._values(mb.tokens),
                    mb.values,
                    mb.returns,
                    mb.tokens.response_mask,
                    self.spec.clip_eps,
                    num_tokens=norm,
                )
                loss = self._poisoned(loss, i == 0 and self._fault_at(plan.first_step + step))
                guard.backward_step(loss, last=i == len(micros) - 1)
                n = float(st["tokens"])
                acc["tokens"] += n
                acc["loss_sum"] += float(loss.detach()) * norm
                acc["clip_sum"] += float(st["clipfrac"]) * n
            acc["skipped"] = 0.0 if guard.applied else 1.0
            acc["max_grad_norm"] = self._grad_norm()
            out.append(dict(acc))
        return out
