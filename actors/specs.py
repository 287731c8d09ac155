"""What the driver gives each DeepSpeed actor (policy, critic, reference, reward): only the fields that
role needs, not the whole config. Plain dataclasses: the driver builds them (``trainers.ppo.setup``)
without importing the actor classes, and they pickle through Ray as they are.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ModelSpec:
    """What one DeepSpeed actor needs: only these fields, not the whole config (STYLE)."""

    model_path: str
    """Hugging Face directory to load (safetensors)."""
    device: str = "cpu"
    """'cpu' (gloo, fp32) or 'cuda'."""
    dtype: str = "fp32"
    """'fp32' or 'bf16' (resolved already, never 'auto')."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage."""
    micro_batch_size: int = 8
    """Rows per forward (and per backward when training)."""
    micro_batch_tokens: int = 0
    """Token budget per forward instead of ``micro_batch_size`` (0: off): no-grad passes pack their shard
    by it with as many micro-batches on every rank; training takes the driver's plan (its count varies
    by step)."""
    temperature: float = 1.0
    """Sampling temperature: every log-prob divides logits by it (docs/ppo_details.md item 3)."""
    torch_threads: int = 1
    """torch intra-op threads in this actor."""
    seed: int = 0
    """torch seed of this actor (nothing random runs in it with dropout off; set for completeness)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint."""
    offload_params: bool = False
    """ZeRO-3 parameter partitions in CPU memory (``trainers.runtime.zero.ds_config``)."""
    logprob_chunk_size: int = 1024
    """Positions of a row whose float32 log-softmax exists at once in log-prob and entropy passes
    (``trainers.algos.logprobs``; 0: whole rows)."""


@dataclasses.dataclass
class TrainSpec(ModelSpec):
    """An actor that also trains (policy, critic)."""

    lr: float = 1e-5
    """Constant AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    grad_accum: int = 1
    """Micro-batches per rank per optimizer step (the plan the driver sends has exactly this many; with
    ``micro_batch_tokens`` DeepSpeed's configured count only, the plan's varies by step)."""
    clip_eps: float = 0.2
    """PPO ratio clip (policy) or value clip around the old values (critic)."""
    ptx_coef: float = 0.0
    """Weight of the pretraining LM loss in the policy's step (PPO-ptx gamma); unused by the critic."""
    clip_eps_high: float | None = None
    """Upper ratio clip of the policy (DAPO's clip-higher); None: ``clip_eps``."""
    kl_loss_coef: float = 0.0
    """Weight of the KL-to-reference loss term of the policy (0: off; the experience then carries no
    reference log-probs)."""
    kl_loss_estimator: str = "k3"
    """KL estimator of that term."""
    loss_agg: str = "token_mean"
    """Policy loss aggregation (``trainers.algos.agg_weights``; docs/ppo_details.md item 24)."""
    tokenizer_path: str | None = None
    """Tokenizer saved next to the final model (policy only)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (``model.gradient_checkpointing``)."""
    offload_optimizer: bool = False
    """fp32 master weights and AdamW state in CPU memory, the step run there (ZeRO-Offload)."""
    weight_sync: str = "blob"
    """Policy only: the weight transport into the rollout engines, as ``trainers.config.transport.choose_transport``
    resolved it ('blob', 'broadcast' or 'ipc')."""
    rollout_tensor_parallel_size: int = 1
    """Policy only: workers per rollout engine (the broadcast group's world is 1 + engines x this)."""
