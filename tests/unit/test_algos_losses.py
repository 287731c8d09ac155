"""PPO policy/value losses, LM loss and the global token-mean aggregation (trainers/algos/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainers.algos import (
    LOG_RATIO_CLAMP,
    lm_loss,
    loss_normaliser,
    masked_mean,
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
