"""The reward actor: the frozen reward model (ZeRO-3 partitioned inference, no optimizer).

    scores(shard)   (n,) RM score of prompt + response at the last real token, + reward_bias

The score is read at each row's last real token found from the attention mask (docs/ppo_details.md item 7),
i.e. the EOS when the response has one, else its last sampled token; ``trainers.runtime.models.reward_scores``
adds the RM's normalising bias (docs/ppo_details.md item 9). Clipping (docs/ppo_details.md item 14) happens in
the driver so that raw and clipped scores can both be logged.
"""

from __future__ import annotations

import torch

from actors.base import ModelWorker
from trainers.ppo.batch import TokenBatch
from trainers.runtime.device import torch_dtype
from trainers.runtime.models import build_value_model, reward_scores


class RewardWorker(ModelWorker):
    """Reward rank: frozen RM weights."""

    def _load_model(self) -> torch.nn.Module:
        # The RM's own class and weights with dropout forced off: the same loader as the critic's.
        model = build_value_model(
            self.spec.model_path,
            dtype=torch_dtype(self.spec.dtype),
            trust_remote_code=self.spec.trust_remote_code,
        )
        model.requires_grad_(False)
        return model

    def scores(self, shard: TokenBatch) -> torch.Tensor:
        """``(n,)`` scores, no grad."""
        return self._map_micro(shard, lambda mb: reward_scores(self.model, mb.sequences, mb.attention_mask))
