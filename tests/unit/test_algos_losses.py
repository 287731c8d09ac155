"""PPO policy/value losses, KL and LM losses, and the split-invariant aggregation (trainers/algos/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainers.algos import (
    LOG_RATIO_CLAMP,
    LOSS_AGG_MODES,
    AlgoConfigError,
    agg_denominator,
    agg_weights,
    aggregate,
    kl_loss,
    lm_loss,
    loss_normaliser,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
)

NAN = float("nan")
MASK = torch.tensor([[1, 1, 0]])


def test_policy_loss_by_hand_both_clipped():
    # eps = 0.2, old = 0 so ratio = exp(logp).
    # t0: ratio 1.5, A = +1: -A r = -1.5, -A clip(r) = -1.2 -> max -1.2 (clipped term active)
    # t1: ratio 0.5, A = -1: -A r = 0.5,  -A clip(r) = 0.8  -> max 0.8  (clipped term active)
    # loss = (-1.2 + 0.8) / 2 = -0.2; clipfrac 1; ratio mean 1, biased std 0.5, max 1.5;
    # approx_kl = 0.5 * mean(ln(1.5)^2, ln(0.5)^2). Both tokens clipped -> zero gradient.
    logp = torch.tensor([[math.log(1.5), math.log(0.5), NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, NAN]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, NAN]], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.2)
    assert stats["clipfrac"].item() == 1.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_std"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["approx_kl"].item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    assert stats["tokens"].item() == 2
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_policy_loss_by_hand_unclipped():
    # t0: ratio 1.1 (inside 1 +- 0.2), A = 2:  -2.2 vs -2.2 -> -2.2, not clipped
    # t1: ratio 1.5, A = -1: 1.5 vs 1.2 -> 1.5 (the pessimistic unclipped term), not clipped
    # loss = (-2.2 + 1.5) / 2 = -0.35, clipfrac 0.
    # d loss / d logp_t = -A_t * ratio_t / 2: t0 -> -1.1, t1 -> +0.75; padding -> 0.
    logp = torch.tensor([[math.log(1.1), math.log(1.5), 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.tensor([[2.0, -1.0, 3.0]], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, MASK)
    assert loss.item() == pytest.approx(-0.35)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1, 0.75, 0.0]], dtype=torch.float64))


def test_first_step_sanity():
    # docs/ppo_details.md item 25: logp == old -> ratio exactly 1, clipfrac 0, approx_kl 0, loss = -mean(A).
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(5, 8, generator=g) - 2
    adv = torch.randn(5, 8, generator=g)
    mask = torch.rand(5, 8, generator=g) > 0.3
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["ratio_std"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    torch.testing.assert_close(loss, -masked_mean(adv, mask))


def test_policy_loss_stats_are_detached_tensors():
    logp = torch.zeros(2, 3, requires_grad=True)
    _, stats = policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_value_loss_by_hand():
    # eps = 0.2
    # t0: V 1.0, V_old 0.5, R 1.5: (V-R)^2 = 0.25; clip(V, 0.3, 0.7) = 0.7 -> (0.7-1.5)^2 = 0.64 -> 0.64
    # t1: V 2.0, V_old 2.1, R 1.0: (V-R)^2 = 1;    clip(V, 1.9, 2.3) = 2.0 -> 1                -> 1
    # loss = 0.5 * (0.64 + 1) / 2 = 0.41; clipfrac 1/2; error (unclipped MSE) = 0.625;
    # vpred_mean 1.5; returns_mean 1.25.
    # Gradient: t0 is clipped -> 0; t1: d/dV 0.5 * (V-R)^2 / 2 = 0.5 * (V - R) = 0.5.
    values = torch.tensor([[1.0, 2.0, NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 2.1, NAN]], dtype=torch.float64)
    returns = torch.tensor([[1.5, 1.0, NAN]], dtype=torch.float64)
    loss, stats = value_loss(values, old, returns, MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.41)
    assert stats["clipfrac"].item() == 0.5
    assert stats["error"].item() == pytest.approx(0.625)
    assert stats["vpred_mean"].item() == pytest.approx(1.5)
    assert stats["returns_mean"].item() == pytest.approx(1.25)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.float64))


def test_value_loss_without_clipping():
    # Plain 0.5 * MSE: 0.5 * (0.25 + 1) / 2 = 0.3125.
    values = torch.tensor([[1.0, 2.0, 0.0]])
    loss, stats = value_loss(
        values, torch.tensor([[0.5, 2.1, 0.0]]), torch.tensor([[1.5, 1.0, 0.0]]), MASK, None
    )
    assert loss.item() == pytest.approx(0.3125)
    assert stats["clipfrac"].item() == 0.0


def test_lm_loss_by_hand():
    # Position 0: logits [0, 0], label 1 -> -log(1/2) = ln 2. Position 1: logits [0, ln 3], label 1 ->
    # -log(3/4). With position 1 ignored the loss is ln 2, otherwise the mean of both.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]], dtype=torch.float64)
    assert lm_loss(logits, torch.tensor([[1, -100]])).item() == pytest.approx(math.log(2))
    both = (math.log(2) - math.log(0.75)) / 2
    assert lm_loss(logits, torch.tensor([[1, 1]])).item() == pytest.approx(both)


def test_lm_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = -100
    labels[2, :1] = -100
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), expected)


# --- item 24: one token mean over the global batch, whatever the split ---------------------------------


def _ppo_batch(seed=5, batch=6, width=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 3, 6, 2, 5])[:batch]
    mask = torch.arange(width).expand(batch, width) < lengths[:, None]
    return {
        "logp": (torch.randn(batch, width, generator=g) * 0.3 - 1).requires_grad_(),
        "old": torch.randn(batch, width, generator=g) * 0.3 - 1,
        "adv": torch.randn(batch, width, generator=g),
        "values": torch.randn(batch, width, generator=g).requires_grad_(),
        "old_values": torch.randn(batch, width, generator=g),
        "returns": torch.randn(batch, width, generator=g),
        "mask": mask,
    }


def _policy(d, rows, num_tokens=None):
    return policy_loss(
        d["logp"][rows], d["old"][rows], d["adv"][rows], d["mask"][rows], num_tokens=num_tokens
    )[0]


def _value(d, rows, num_tokens=None):
    v, ov, r, m = d["values"][rows], d["old_values"][rows], d["returns"][rows], d["mask"][rows]
    return value_loss(v, ov, r, m, num_tokens=num_tokens)[0]


@pytest.mark.parametrize("which", ["policy", "value"])
def test_two_shards_sum_to_one_shot_loss_and_grad(which):
    d = _ppo_batch()
    fn, leaf = (_policy, d["logp"]) if which == "policy" else (_value, d["values"])
    everything = slice(None)
    shards = [slice(0, 2), slice(2, 6)]  # 8 and 16 real tokens: different counts
    n = int(d["mask"].sum())
    one_shot = fn(d, everything)
    (grad_one,) = torch.autograd.grad(one_shot, leaf)
    summed = sum(fn(d, rows, num_tokens=n) for rows in shards)
    (grad_sum,) = torch.autograd.grad(summed, leaf)
    torch.testing.assert_close(summed, one_shot)
    torch.testing.assert_close(grad_sum, grad_one)
    # Without the global count (per-shard means), the sum is not the token mean: the test can fail.
    naive = sum(fn(d, rows) for rows in shards) / len(shards)
    assert not torch.allclose(naive, one_shot)


def test_lm_loss_two_shards_sum_to_one_shot_loss_and_grad():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 6, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[0, 2:] = -100
    labels[3, :4] = -100
    n = int((labels != -100).sum())
    one_shot = lm_loss(logits, labels)
    (grad_one,) = torch.autograd.grad(one_shot, logits)
    summed = lm_loss(logits[:1], labels[:1], num_tokens=n) + lm_loss(logits[1:], labels[1:], num_tokens=n)
    (grad_sum,) = torch.autograd.grad(summed, logits)
    torch.testing.assert_close(summed, one_shot)
    torch.testing.assert_close(grad_sum, grad_one)


def test_loss_normaliser_makes_ddp_with_accumulation_equal_one_shot():
    # Simulate W = 2 ranks x G = 2 micro-batches under an engine that divides each micro-batch loss by G
    # and averages gradients over ranks (DeepSpeed's behaviour). Each micro-batch has a different size.
    d = _ppo_batch()
    world, accum = 2, 2
    micro = {0: [slice(0, 1), slice(1, 2)], 1: [slice(2, 5), slice(5, 6)]}
    n = int(d["mask"].sum())
    norm = loss_normaliser(n, world_size=world, engine_grad_accum=accum)
    (grad_one,) = torch.autograd.grad(_policy(d, slice(None)), d["logp"])
    rank_grads = []
    for rank in range(world):
        grad = torch.zeros_like(d["logp"])
        for rows in micro[rank]:
            grad += torch.autograd.grad(_policy(d, rows, num_tokens=norm) / accum, d["logp"])[0]
        rank_grads.append(grad)
    torch.testing.assert_close(sum(rank_grads) / world, grad_one)


def test_loss_normaliser_values_and_errors():
    assert loss_normaliser(1000) == 1000.0
    assert loss_normaliser(1000, world_size=4, engine_grad_accum=2) == 125.0
    for bad in [(0, 1, 1), (10, 0, 1), (10, 1, 0)]:
        with pytest.raises(ValueError):
            loss_normaliser(*bad)
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), num_tokens=0)


def test_num_tokens_may_be_a_tensor():
    d = _ppo_batch()
    n = d["mask"].sum()
    torch.testing.assert_close(_policy(d, slice(None), num_tokens=n), _policy(d, slice(None)))


# --- robustness: extreme inputs, padding garbage, empty batches ------------------------------------------


def test_policy_loss_extreme_logprobs_are_finite():
    # Log-probs of -1e4 against 0 and the reverse, with both signs of advantage: the log-ratio clamp keeps
    # the loss and the gradient finite.
    logp = torch.tensor([[-1e4, -1e4, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, -1e4, -1e4]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats["ratio_max"].item() == pytest.approx(math.exp(LOG_RATIO_CLAMP), rel=1e-5)


def test_value_and_lm_loss_extreme_inputs_are_finite():
    values = torch.tensor([[1e4, -1e4]], requires_grad=True)
    loss, _ = value_loss(values, torch.tensor([[-1e4, 1e4]]), torch.tensor([[-1e4, 1e4]]), torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(values.grad).all() and values.grad.abs().sum() > 0
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4]]], requires_grad=True)
    ce = lm_loss(logits, torch.tensor([[1, 1]]))
    ce.backward()
    assert ce.item() == pytest.approx(1e4)  # position 0: label 1 is 2e4 below the top logit
    assert torch.isfinite(logits.grad).all()


def test_padding_garbage_does_not_reach_loss_or_grad():
    d = _ppo_batch()
    pad = ~d["mask"]
    dirty = {
        k: (v.detach().clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in d.items()
    }
    for key in ("logp", "old", "adv", "values", "old_values", "returns"):
        dirty[key][pad] = float("nan") if key in ("logp", "values", "adv") else float("inf")
    dirty["logp"].requires_grad_()
    dirty["values"].requires_grad_()
    for fn, leaf in ((_policy, "logp"), (_value, "values")):
        clean_loss, dirty_loss = fn(d, slice(None)), fn(dirty, slice(None))
        torch.testing.assert_close(dirty_loss, clean_loss)
        (g_clean,) = torch.autograd.grad(clean_loss, d[leaf])
        (g_dirty,) = torch.autograd.grad(dirty_loss, dirty[leaf])
        assert torch.isfinite(g_dirty).all()
        torch.testing.assert_close(g_dirty, g_clean)


def test_all_padding_batch_gives_zero_loss_and_zero_grad():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and stats["tokens"].item() == 0
    assert torch.equal(logp.grad, torch.zeros_like(logp))


# --- DAPO clip-higher and the KL loss term ----------------------------------------------------------------


def _one_token_policy(ratio, advantage, **kwargs):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, stats = policy_loss(
        logp, old, torch.tensor([[advantage]], dtype=torch.float64), torch.ones(1, 1), **kwargs
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad.item(), stats["clipfrac"].item()


def test_clip_higher_keeps_the_gradient_of_a_positive_advantage_up_to_one_plus_eps_high():
    # A = +1, ratio 1.25. Symmetric eps 0.2: clip at 1.2, max(-1.25, -1.2) = -1.2 is constant: no gradient.
    # eps_high 0.28: 1.25 is inside [0.8, 1.28], loss -ratio, d(-ratio)/d logp = -1.25.
    assert _one_token_policy(1.25, 1.0, clip_eps=0.2) == pytest.approx((-1.2, 0.0, 1.0))
    assert _one_token_policy(1.25, 1.0, clip_eps=0.2, clip_eps_high=0.28) == pytest.approx(
        (-1.25, -1.25, 0.0)
    )


@pytest.mark.parametrize("clip_eps_high", [None, 0.28])
def test_clip_higher_leaves_the_low_side_alone(clip_eps_high):
    # A = -1, ratio 0.75: -A r = 0.75, -A clip(r, 0.8, .) = 0.8 is the max and constant: clipped, no gradient.
    assert _one_token_policy(0.75, -1.0, clip_eps=0.2, clip_eps_high=clip_eps_high) == pytest.approx(
        (0.8, 0.0, 1.0)
    )


def test_policy_loss_defaults_are_unchanged_by_the_new_arguments():
    d = _ppo_batch()
    n = int(d["mask"].sum())
    args = (d["logp"], d["old"], d["adv"], d["mask"])
    base, base_stats = policy_loss(*args, num_tokens=n)
    same, same_stats = policy_loss(
        *args, num_tokens=n, clip_eps_high=0.2, weights=agg_weights(d["mask"], "token_mean")
    )
    assert torch.equal(base, same)
    assert all(torch.equal(base_stats[k], same_stats[k]) for k in base_stats)


def test_kl_loss_k3_is_zero_with_zero_gradient_where_policy_equals_reference():
    logp = torch.tensor([[-1.3, -0.2, NAN]], requires_grad=True)
    loss, stats = kl_loss(logp, logp.detach().clone(), MASK)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and stats["kl"].item() == 0.0
    assert grad.tolist() == [[0.0, 0.0, 0.0]]


def test_kl_loss_by_hand_gradient_through_logprobs_only():
    # d = [ln 2, 0]: k3 = e^-d - 1 + d = [ln 2 - 0.5, 0], token mean (ln 2 - 0.5) / 2.
    # d k3 / d logp = 1 - e^-d = [0.5, 0], divided by the 2 tokens: [0.25, 0]; padding gets nothing.
    logp = torch.tensor([[math.log(2.0), 0.0, NAN]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, 0.0, NAN]], dtype=torch.float64, requires_grad=True)
    loss, stats = kl_loss(logp, ref, MASK)
    loss.backward()
    assert loss.item() == pytest.approx((math.log(2.0) - 0.5) / 2)
    assert logp.grad[0].tolist() == pytest.approx([0.25, 0.0, 0.0])
    assert ref.grad is None
    assert stats["kl"].item() == pytest.approx(loss.item()) and not stats["kl"].requires_grad
    k1, _ = kl_loss(logp, ref, MASK, kind="k1", num_tokens=4)
    assert k1.item() == pytest.approx(math.log(2.0) / 4)


# --- loss aggregation modes: per-row weights, one global denominator ----------------------------------------


def test_agg_weights_and_denominators_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert agg_weights(mask, "token_mean").tolist() == mask.float().tolist()
    assert agg_weights(mask, "token_sum_norm").tolist() == mask.float().tolist()
    assert agg_weights(mask, "seq_mean_token_mean").tolist() == [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert agg_denominator(mask, "token_mean", 10) == 3.0
    assert agg_denominator(mask, "seq_mean_token_mean", 10) == 3.0  # rows, the empty one included
    assert agg_denominator(mask, "token_sum_norm", 10) == 30.0
    assert agg_denominator(torch.zeros(2, 3), "token_mean", 10) == 1.0  # never 0: loss 0, not 0/0
    with pytest.raises(AlgoConfigError, match="unknown loss aggregation"):
        agg_weights(mask, "seq_mean")
    with pytest.raises(AlgoConfigError, match="norm_length"):
        agg_denominator(mask, "token_sum_norm", 0)


def test_the_modes_differ_when_lengths_differ():
    # Row 0: three tokens of loss 1; row 1: one token of loss 4.
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])

    def value(mode, norm_length=4):
        return aggregate(
            per_token, mask, agg_denominator(mask, mode, norm_length), agg_weights(mask, mode)
        ).item()

    assert value("token_mean") == pytest.approx(7 / 4)  # (1 + 1 + 1 + 4) / 4 tokens
    assert value("seq_mean_token_mean") == pytest.approx(5 / 2)  # (mean 1 + mean 4) / 2 rows
    assert value("token_sum_norm") == pytest.approx(7 / 8)  # 7 / (2 rows x 4)
    # Weights without num_tokens: a weighted mean, here the mean over rows of the row means.
    assert aggregate(per_token, mask, None, agg_weights(mask, "seq_mean_token_mean")).item() == pytest.approx(
        2.5
    )


AGG_LENGTHS = [5, 1, 0, 7, 3, 6, 2, 4]  # ragged, one empty row
# Two ranks x two micro-batches, each a list of rows: contiguous of unequal sizes, and shuffled.
SPLITS = [
    [[[0], [1, 2, 3]], [[4, 5], [6, 7]]],
    [[[0, 1, 2], [3]], [[4], [5, 6, 7]]],
    [[[7, 2], [0, 5]], [[3], [1, 4, 6]]],
]


def _agg_batch(seed=11, width=7):
    g = torch.Generator().manual_seed(seed)
    batch = len(AGG_LENGTHS)
    return {
        "logp": (torch.randn(batch, width, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_(),
        "old": torch.randn(batch, width, generator=g, dtype=torch.float64) * 0.3 - 1,
        "adv": torch.randn(batch, width, generator=g, dtype=torch.float64),
        "mask": torch.arange(width).expand(batch, width) < torch.tensor(AGG_LENGTHS)[:, None],
    }


def _agg_loss(which, d, rows, mode, denominator):
    logp, old, adv, mask = (d[k][rows] for k in ("logp", "old", "adv", "mask"))
    w = agg_weights(mask, mode)
    if which == "aggregate":
        return aggregate(logp.square() + logp, mask, denominator, weights=w)
    if which == "policy":
        return policy_loss(logp, old, adv, mask, num_tokens=denominator, clip_eps_high=0.28, weights=w)[0]
    return kl_loss(logp, old, mask, num_tokens=denominator, weights=w)[0]


@pytest.mark.parametrize("which", ["aggregate", "policy", "kl"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_every_mode_is_invariant_to_ranks_and_micro_batches(mode, which):
    d = _agg_batch()
    everything = list(range(len(AGG_LENGTHS)))
    denominator = agg_denominator(d["mask"], mode, norm_length=10)
    whole = _agg_loss(which, d, everything, mode, denominator)
    (grad_whole,) = torch.autograd.grad(whole, d["logp"])
    assert grad_whole.abs().sum() > 0
    for split in SPLITS:
        parts = [rows for rank in split for rows in rank]
        assert sorted(r for rows in parts for r in rows) == everything
        summed = sum(_agg_loss(which, d, rows, mode, denominator) for rows in parts)
        (grad_sum,) = torch.autograd.grad(summed, d["logp"])
        torch.testing.assert_close(summed, whole, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad_sum, grad_whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_whole_batch_value_of_each_mode_matches_its_definition(mode):
    d = _agg_batch()
    per_token, mask = (d["logp"].square() + d["logp"]).detach(), d["mask"]
    got = aggregate(per_token, mask, agg_denominator(mask, mode, 10), agg_weights(mask, mode))
    rows = [per_token[b, :n] for b, n in enumerate(AGG_LENGTHS)]
    if mode == "token_mean":
        expected = masked_mean(per_token, mask)
    elif mode == "seq_mean_token_mean":
        expected = sum(r.mean() for r in rows if len(r)) / len(rows)
    else:
        expected = masked_sum(per_token, mask) / (len(rows) * 10)
    torch.testing.assert_close(got, expected)


def test_aggregate_rejects_weights_of_another_shape():
    with pytest.raises(ValueError, match="weights"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), None, weights=torch.ones(2, 2))
