"""PPO policy and value losses, the KL-to-reference loss and the language-model loss, with one aggregation.

Aggregation (docs/ppo_details.md item 24): every loss is a sum over the real tokens of the **global**
batch, the optimizer step's whole minibatch across gradient-accumulation micro-batches and data-parallel
ranks, divided by one global denominator. Each loss takes ``num_tokens``:

- ``num_tokens=None``: plain masked mean over this call's tokens (one device, no accumulation).
- ``num_tokens=N``: ``masked_sum(per_token_loss) / N``. Summing these over micro-batches equals the
  one-shot token mean when N is the global count of real tokens, whatever the shard sizes. Engines that
  rescale (grad averaging over ranks, loss division by accumulation steps) are compensated by passing
  :func:`loss_normaliser` instead of N.

The policy and KL losses also take per-token ``weights`` for the other modes of ``LOSS_AGG_MODES``
(:func:`agg_weights`, :func:`agg_denominator`). A token's weight depends only on its own row and the
denominator only on the global minibatch, so every mode stays independent of how the batch is split;
a per-micro-batch mean, which is not, is not offered.
"""

from __future__ import annotations

import torch

from trainers.algos._common import AlgoConfigError, bool_mask, upcast, zero_padding
from trainers.algos.kl import kl_estimate
from trainers.algos.logprobs import logprobs_from_logits
from trainers.algos.masked import masked_count, masked_mean, masked_sum, masked_var

#: The log-ratio is clamped to +-20 (ratio in [2e-9, 4.9e8]) before exp() so a diverged policy gives a
#: finite loss and gradient. Inside the clamp gradients are exact; a token outside it has its ratio far
#: beyond the clip range, where PPO gives it no gradient for A > 0 and an exploding one for A < 0: it
#: gets none.
LOG_RATIO_CLAMP = 20.0

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "token_sum_norm")


def loss_normaliser(global_num_tokens: int | float, world_size: int = 1, engine_grad_accum: int = 1) -> float:
    """The ``num_tokens`` each rank passes to the losses so the optimizer sees the global token mean.

    With N real tokens in the whole minibatch, each rank computes ``sum_local / d`` per micro-batch and
    calls backward (gradients add over micro-batches):

    - the engine *averages* gradients over ``world_size`` ranks (DDP, DeepSpeed): multiply back, d = N / W;
    - the engine *divides* each loss by its accumulation steps G (DeepSpeed ``engine.backward``): d = N / (W G).

    Check with d = N / (W G): the engine applies ``(1/W) sum_ranks sum_micro (1/G) grad(sum_local / d)``
    ``= (1/N) sum_ranks sum_micro grad(sum_local) = grad(sum_all / N)``. Pass ``engine_grad_accum=1`` if
    the engine does not divide the loss by its accumulation steps.
    """
    if global_num_tokens <= 0 or world_size < 1 or engine_grad_accum < 1:
        raise ValueError(
            f"need global_num_tokens > 0, world_size >= 1, engine_grad_accum >= 1; got "
            f"{global_num_tokens}, {world_size}, {engine_grad_accum}"
        )
    return float(global_num_tokens) / (world_size * engine_grad_accum)


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise AlgoConfigError(
            f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}"
        )


def agg_weights(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, T)`` float32 per-token weights of aggregation ``mode`` (item 24), 0 on padding.

    - ``token_mean``, ``token_sum_norm``: 1 on every real token.
    - ``seq_mean_token_mean``: ``1 / (real tokens of the row)``, so each sequence weighs the same
      whatever its length (verl's ``seq-mean-token-mean``); an empty row weighs 0.

    Each weight depends only on its own row, so the weights of a shard are the whole batch's weights
    restricted to that shard.
    """
    _check_mode(mode)
    m = (mask != 0).float()  # (B, T)
    if mode == "seq_mean_token_mean":
        return m / m.sum(dim=1, keepdim=True).clamp(min=1)
    return m


def agg_denominator(mask: torch.Tensor, mode: str, norm_length: int) -> float:
    """The global denominator of ``mode`` for the optimizer step's whole minibatch ``mask (B, T)``.

    - ``token_mean``: the number of real tokens.
    - ``seq_mean_token_mean``: the number of rows B.
    - ``token_sum_norm``: ``B * norm_length``, a constant per step that does not depend on the response
      lengths (Dr. GRPO, Liu et al. 2025); the driver passes ``rollout.max_new_tokens``.

    At least 1, so an all-padding minibatch gives loss 0 rather than 0/0. With data parallelism or an
    engine that divides by its accumulation steps, pass ``loss_normaliser(agg_denominator(...), W, G)`` as
    ``num_tokens``. Returns a Python float (one host sync per optimizer step).
    """
    _check_mode(mode)
    if mode == "token_mean":
        total = float(masked_count(mask))
    elif mode == "seq_mean_token_mean":
        total = float(mask.shape[0])
    else:
        if norm_length < 1:
            raise AlgoConfigError(f"token_sum_norm needs norm_length >= 1, got {norm_length}")
        total = float(mask.shape[0] * norm_length)
    return max(total, 1.0)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float | torch.Tensor | None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate a ``(B, T)`` per-token loss over real tokens (module docstring, item 24).

    Without ``weights``: the token mean (``num_tokens=None``) or ``masked_sum / num_tokens``. With
    ``weights (B, T)``: the numerator is ``masked_sum(per_token * weights)``, divided by ``num_tokens``
    or, when that is None, by the weights' sum over real tokens (a weighted mean; 0 if they sum to 0).
    """
    if num_tokens is not None and not isinstance(num_tokens, torch.Tensor) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if weights is None:
        return (
            masked_mean(per_token, mask) if num_tokens is None else masked_sum(per_token, mask) / num_tokens
        )
    if weights.shape != per_token.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match the loss {tuple(per_token.shape)}")
    total = masked_sum(per_token * weights, mask)
    if num_tokens is None:
        weight_sum = masked_sum(weights, mask)
        return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
    return total / num_tokens


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
    clip_eps_high: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017; item 18): token mean of
    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))`` with ``ratio = exp(logprobs - old_logprobs)``.

    ``clip_eps_high=None`` is the symmetric clip (``eps_high = eps``); a larger value is DAPO's
    clip-higher (Yu et al. 2025): a token with A > 0 keeps its gradient up to ratio ``1 + eps_high``, so
    unlikely tokens can grow. ``num_tokens`` and ``weights`` go to :func:`aggregate`.

    Gradient flows through ``logprobs`` only. Stats are detached 0-dim tensors over this call's real tokens
    (no host sync): ``clipfrac`` (share of tokens where the clipped term is the larger, i.e. active),
    ``approx_kl`` = ``0.5 * mean((logp - old)^2)`` (the k2 estimator, as lm-human-preferences logs; 0 iff
    the policies agree on the sampled tokens), ``ratio_mean``, ``ratio_std``, ``ratio_max``, ``tokens``.
    At the first minibatch of a rollout all of logp == old, so ratio = 1, clipfrac = 0, approx_kl = 0 and
    the loss is ``-masked_mean(A)`` (item 25).
    """
    m = bool_mask(mask, logprobs)
    logp = zero_padding(upcast(logprobs), m)  # (B, T); padding may hold garbage
    old = zero_padding(upcast(old_logprobs.detach()), m)
    adv = zero_padding(upcast(advantages.detach()), m)
    log_ratio = logp - old  # (B, T)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), m, num_tokens, weights)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": 0.5 * masked_mean(log_ratio.square(), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_std": masked_var(ratio, m).sqrt(),
            "ratio_max": zero_padding(ratio, m).max(),
            "tokens": masked_count(m),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    num_tokens: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL to the reference as a loss term (GRPO's placement, Shao et al. 2024), not a reward penalty.

    The per-token :func:`trainers.algos.kl_estimate` of ``kind`` (default k3, never negative, 0 with a
    zero gradient where the policy equals the reference), aggregated like :func:`policy_loss` through
    ``num_tokens`` and ``weights``. Gradient flows through ``logprobs`` only; for k3 it is
    ``(1 - pi_ref / pi) * grad log pi`` per token. Stats (detached 0-dim): ``kl``, the masked mean of the
    estimate over this call's real tokens.
    """
    m = bool_mask(mask, logprobs)
    logp = zero_padding(upcast(logprobs), m)  # (B, T); padding may hold garbage
    ref = zero_padding(upcast(ref_logprobs.detach()), m)
    kl = kl_estimate(logp, ref, kind, mask=m)  # (B, T)
    loss = aggregate(kl, m, num_tokens, weights)
    return loss, {"kl": masked_mean(kl.detach(), m)}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (item 19): ``0.5 *`` token mean of
    ``max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``; ``clip_eps=None`` gives plain
    ``0.5 * MSE``. Gradient flows through ``values`` only.

    Stats (detached 0-dim, this call's real tokens): ``clipfrac`` (share where the clipped term is the
    larger), ``vpred_mean``, ``error`` (unclipped mean squared error), ``returns_mean``, ``tokens``.
    """
    m = bool_mask(mask, values)
    v = zero_padding(upcast(values), m)  # (B, T)
    old = zero_padding(upcast(old_values.detach()), m)
    ret = zero_padding(upcast(returns.detach()), m)
    unclipped = (v - ret).square()
    if clip_eps is None:
        clipped = unclipped
    else:
        # old + clamp(v - old) equals clip(v, old - eps, old + eps), gradient 0 where clipped.
        clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - ret).square()
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), m, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(v.dtype), m),
            "vpred_mean": masked_mean(v, m),
            "error": masked_mean(unclipped, m),
            "returns_mean": masked_mean(ret, m),
            "tokens": masked_count(m),
        }
    return loss, {k: t.detach() for k, t in stats.items()}


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_tokens: float | torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Token-mean cross-entropy (SFT, pretraining, and the ptx term of item 20).

    ``logits (B, T, V)`` must already be aligned so ``logits[:, t]`` predicts ``labels[:, t]`` (callers
    shift, e.g. with :func:`shift_for_lm`); labels equal to ``ignore_index`` are excluded. Temperature is
    1: this is the likelihood of data, not of samples. ``num_tokens`` as in the module docstring; for
    ptx it is the global count of non-ignored *pretraining* labels, so ``L_ppo + gamma * L_lm`` mixes two
    token means. ``chunk_size`` as in :func:`logprobs_from_logits` (the PPO policy's ptx term passes
    ``ppo.logprob_chunk_size``).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    valid = labels != ignore_index  # (B, T)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -logprobs_from_logits(logits, safe_labels, chunk_size=chunk_size)  # (B, T)
    return aggregate(nll, valid, num_tokens)
