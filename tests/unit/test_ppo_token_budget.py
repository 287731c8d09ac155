"""Token-budget micro-batches (docs/design.md, "Token-budget micro-batches (issue 17)") on a tiny model in
one process: cutting a micro-batch to its real columns changes no real token's log-prob, and one optimizer
step's gradient is the same over token-budget micro-batches as over fixed-size ones, since each
micro-batch's loss is ``sum / (N / W)`` with the step's global token count N (docs/ppo_details.md item 24).
The same with real ZeRO-3 ranks: tests/integration/test_ppo_policy.py."""

from __future__ import annotations

import torch

from trainers.algos import logprobs_from_logits, loss_normaliser, policy_loss
from trainers.ppo import schedule
from trainers.ppo.batch import Experience, build_rollout_batch
from trainers.runtime.models import forward_logits
from trainers.runtime.presets import build_config


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 60, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g) for _ in range(n)
    ]
    responses = [
        torch.randint(3, 60, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g) for _ in range(n)
    ]
    rollout = build_rollout_batch([p.tolist() for p in prompts], [r.tolist() for r in responses], 0, (2,))
    mask = rollout.tokens.response_mask.float()
    old = -3.0 + 0.3 * torch.randn(mask.shape, generator=g) * mask
    adv = torch.randn(mask.shape, generator=g) * mask
    return Experience(rollout.tokens, old * mask, adv)


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(build_config("tiny", 64)).eval()


def _logprobs(model, mb: Experience) -> torch.Tensor:
    r = mb.tokens.response_len
    logits = forward_logits(model, mb.tokens.sequences, mb.tokens.attention_mask)[:, -r - 1 : -1]
    return logprobs_from_logits(logits, mb.tokens.sequences[:, -r:], 1.0)  # (m, R)


def test_trimmed_rows_keep_every_real_tokens_logprob():
    model, exp = _model(), _batch()
    sub = exp.rows(torch.tensor([0, 3]))
    cut = sub.trimmed()
    lengths = sub.tokens.row_lengths()
    assert cut.tokens.sequences.shape[1] == max(p for p, _ in lengths) + max(r for _, r in lengths)
    assert cut.old_logprobs.shape == cut.tokens.response_mask.shape
    with torch.no_grad():
        full, short = _logprobs(model, sub), _logprobs(model, cut)
    r = cut.tokens.response_len
    mask = sub.tokens.response_mask.bool()
    assert not mask[:, r:].any()  # only padding was cut
    torch.testing.assert_close(short[mask[:, :r]], full[mask], rtol=0, atol=1e-5)


def _step_grads(model, exp: Experience, micros: list[list[torch.Tensor]], trim: bool) -> torch.Tensor:
    """The summed gradient of one optimizer step over ``micros[rank]``, averaged over the ranks as
    DeepSpeed does, each micro-batch's loss ``sum / (N / W)``."""
    model.zero_grad()
    world, n = len(micros), float(exp.tokens.response_mask.sum())
    for rank_micros in micros:
        for idx in rank_micros:
            mb = exp.rows(idx)
            mb = mb.trimmed() if trim else mb
            loss, _ = policy_loss(
                _logprobs(model, mb),
                mb.old_logprobs,
                mb.advantages,
                mb.tokens.response_mask,
                num_tokens=loss_normaliser(n, world),
            )
            (loss / world).backward()  # DeepSpeed's mean over the ranks
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_one_step_gradient_is_the_same_by_tokens_or_by_rows():
    model, exp = _model(), _batch(n=8, seed=1)
    steps = [torch.arange(8)]
    fixed = schedule.rank_micro_batches(steps, world=2, micro_batch_size=2)
    by_tokens = schedule.rank_micro_batches(
        steps, world=2, micro_batch_size=2, micro_batch_tokens=60, lengths=exp.tokens.row_lengths()
    )
    assert [[len(m) for m in r[0]] for r in by_tokens] == [[3, 1], [3, 1]]  # not the fixed 2 + 2
    reference = _step_grads(model, exp, [r[0] for r in fixed], trim=False)
    got = _step_grads(model, exp, [r[0] for r in by_tokens], trim=True)
    assert reference.abs().max() > 0
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)
