"""The reference actor: the frozen SFT model (ZeRO-3 partitioned inference, no optimizer).

    logprobs(shard)   (n, R) log-probs of the response tokens at the sampling temperature, no grad

It answers the same question as the policy's ``logprobs`` with the SFT weights, so at step 0 the two
agree exactly and the KL is 0 (docs/ppo_details.md item 25).
"""

from __future__ import annotations

import torch

from actors.base import ModelWorker
from trainers.runtime.device import torch_dtype
from trainers.runtime.models import build_causal_lm


class ReferenceWorker(ModelWorker):
    """Reference rank: frozen SFT weights; ``logprobs`` comes from :class:`actors.base.ModelWorker`."""

    def _load_model(self) -> torch.nn.Module:
        model = build_causal_lm(
            path=self.spec.model_path,
            dropout=0.0,
            dtype=torch_dtype(self.spec.dtype),
            trust_remote_code=self.spec.trust_remote_code,
        )
        model.requires_grad_(False)
        return model
