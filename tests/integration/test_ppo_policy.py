"""The policy actor on its own: 2 ZeRO-3 ranks over gloo, driven the way the PPO driver drives it.

The ptx term (docs/ppo_details.md item 20) is tested where it can be isolated: with all advantages 0 the PPO
term has zero gradient, so a step without ptx must leave every weight exactly as it was, and a step with ptx
batches must move them and lower the pretraining loss. The loss aggregation (docs/ppo_details.md item 24) is
tested by splitting one optimizer step two ways: 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches must
give the same gradient norm and the same weights, for every ``ppo.loss_agg`` mode.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

WORLD = 2


def start_policy(ray, model_dir, world: int, grad_accum: int, name: str, **spec_fields):
    """``world`` PolicyWorker ranks (ZeRO-3, micro-batches of 2 rows) built from ``model_dir``;
    ``spec_fields`` set further :class:`actors.specs.TrainSpec` fields (loss aggregation, KL loss...).
    The group's ``build_facts`` are what each rank's ``build`` returned."""
    from actors.policy import PolicyWorker
    from actors.specs import TrainSpec
    from cluster.actor_group import ActorGroup
    from cluster.placement import place_roles

    placements = place_roles({"policy": [{"CPU": 1.0}] * world}, colocated=False, timeout_s=120, name=name)
    spec = TrainSpec(
        model_path=str(model_dir),
        micro_batch_size=2,
        grad_accum=grad_accum,
        lr=1e-3,
        ptx_coef=1.0,
        **spec_fields,
    )
    group = ActorGroup(
        PolicyWorker, placements["policy"], run_name=name, init_kwargs={"spec": spec}, backend="gloo"
    )
    group.build_facts = ray.get(group.map(lambda a, _r: a.build.remote()))
    return group, placements


@pytest.fixture(scope="module")
def policy(ray_local, sft_model_dir):
    """Two PolicyWorker ranks (one micro-batch of 2 rows per rank per step) built from the SFT model."""
    from cluster.placement import release

    group, placements = start_policy(ray_local, sft_model_dir, WORLD, grad_accum=1, name="test-ptx")
    yield group
    group.kill()
    release(placements)


@pytest.fixture(scope="module")
def data(world_dir):
    """A rollout-shaped batch of 4 rows (prompt + a made-up response) and 2 ptx rows per rank."""
    from tests.conftest import template_ids
    from trainers.data.collate import encode_text
    from trainers.data.tokenizer import load_tokenizer
    from trainers.ppo.batch import build_rollout_batch

    tok = load_tokenizer(world_dir / "tokenizer")
    texts = [
        (f"Name {i} animals that live in rivers.", "Otters, herons and trout." * (i + 1)) for i in range(4)
    ]
    prompts = [template_ids(tok, p) for p, _ in texts]
    responses = [template_ids(tok, p, r)[len(template_ids(tok, p)) :] for p, r in texts]
    batch = build_rollout_batch(prompts, responses, tok.pad_token_id, (tok.eos_token_id,))
    ptx_rows = [encode_text(tok, f"The old mill stood by the river for {i} years.") for i in range(2 * WORLD)]
    return {"batch": batch, "ptx_rows": ptx_rows, "pad": tok.pad_token_id}


def _state(ray, group) -> dict[str, torch.Tensor]:
    return ray.get(group.map(lambda a, _r: a.gathered_state_dict.remote()))[0]  # collective; rank 0 holds it


def _experience(batch, old_logprobs, advantages=None, ref_logprobs=None):
    """The policy's view of ``batch`` (zero advantages unless given; the critic's fields are zeros)."""
    from trainers.ppo.batch import Experience

    zeros = torch.zeros_like(old_logprobs)
    advantages = zeros if advantages is None else advantages
    return Experience(
        batch.tokens, old_logprobs, advantages, values=zeros, returns=zeros, ref_logprobs=ref_logprobs
    )


def _plans(batch, world: int, ptx_rows, pad, loss_agg: str = "token_mean", budget: int = 0):
    """Each rank's plan of one optimizer step over all rows of ``batch``, split like the driver (the
    policy loss's denominator as ``plan_training`` computes it for ``loss_agg``): micro-batches of 2 rows,
    or by the token budget ``budget`` (``ppo.micro_batch_tokens``) with one ptx slot per micro-batch."""
    from trainers.algos import agg_denominator
    from trainers.ppo.schedule import ptx_plan, rank_micro_batches, rank_plans, step_token_counts

    steps = [torch.arange(len(batch))]
    mask = batch.tokens.response_mask
    tokens = step_token_counts(mask, steps)
    denominators = [agg_denominator(mask, loss_agg, mask.shape[1])]
    micros = rank_micro_batches(steps, world, 2, budget, batch.tokens.row_lengths())
    micro_steps = len(micros[0][0])
    ptx = None if ptx_rows is None else [ptx_plan(ptx_rows, world, micro_steps=micro_steps, pad_id=pad)]
    return rank_plans(
        steps,
        world,
        micro_batch_size=2,
        step_tokens=tokens,
        first_step=1,
        ptx=ptx,
        denominators=denominators,
        micros=micros,
    )


def _train(
    ray,
    group,
    batch,
    old_logprobs,
    ptx_rows,
    pad,
    advantages=None,
    ref_logprobs=None,
    loss_agg="token_mean",
    budget=0,
):
    """One optimizer step over all rows of ``batch`` (zero advantages unless given), split like the driver."""
    experience = _experience(batch, old_logprobs, advantages, ref_logprobs)
    plans = _plans(batch, len(group), ptx_rows, pad, loss_agg, budget)
    return ray.get(group.map(lambda a, r: a.train.remote(experience, plans[r])))


def _old_logprobs(ray, group, batch) -> torch.Tensor:
    """``(N, R)`` log-probs of the batch's responses by the group's engine, the way the driver shards."""
    from trainers.data.sharding import equal_shards, unshard

    shards = equal_shards(len(batch), len(group))
    parts = ray.get(
        [a.logprobs.remote(batch.tokens.rows(shard.indices)) for a, shard in zip(group.actors, shards)]
    )
    return unshard(parts, shards)


def test_zero_advantages_without_ptx_leave_weights_unchanged_and_ptx_alone_moves_them(
    ray_local, policy, data
):
    from trainers.ppo.metrics import sum_over_ranks

    batch = data["batch"]
    old = _old_logprobs(ray_local, policy, batch)  # (4, R) by the training engine itself: ratio 1 at first
    before = _state(ray_local, policy)

    stats = sum_over_ranks(_train(ray_local, policy, batch, old, None, data["pad"]))
    after_ppo_only = _state(ray_local, policy)
    assert stats[0]["max_abs_log_ratio"] == 0.0
    assert all(torch.equal(before[k], after_ppo_only[k]) for k in before)  # zero advantages: zero gradient

    first = sum_over_ranks(_train(ray_local, policy, batch, old, data["ptx_rows"], data["pad"]))[0]
    after_ptx = _state(ray_local, policy)
    changed = [k for k in before if not torch.equal(before[k], after_ptx[k])]
    assert changed == list(before)  # every tensor moved, from the ptx term alone

    second = sum_over_ranks(_train(ray_local, policy, batch, old, data["ptx_rows"], data["pad"]))[0]
    assert second["ptx_sum"] < first["ptx_sum"]  # the step went down the pretraining loss


def _rank_budget(batch, world: int) -> int:
    """A token budget under which rank 0's rows of the step fit in one micro-batch and the last rank's
    (longer responses) do not: rank 0 must split further to the last rank's count."""
    from trainers.data.packing import pack, padded_size

    lengths = batch.tokens.row_lengths()
    per_rank = len(lengths) // world
    budget = padded_size(lengths[:per_rank])
    assert len(pack(lengths[:per_rank], budget)) == 1 and len(pack(lengths[-per_rank:], budget)) == 2
    return budget


@pytest.mark.parametrize(
    ("loss_agg", "extra", "by_tokens"),
    [
        ("token_mean", {}, False),
        ("seq_mean_token_mean", {"kl_loss_coef": 0.5, "clip_eps_high": 0.28}, True),
        ("token_sum_norm", {"kl_loss_coef": 0.5, "clip_eps_high": 0.28}, False),
    ],
)
def test_one_step_is_the_same_over_2_ranks_or_2_micro_batches(
    ray_local, sft_model_dir, data, loss_agg, extra, by_tokens
):
    """docs/ppo_details.md item 24: each ``ppo.loss_agg`` is the same aggregate over the whole minibatch,
    whatever the split -- with the KL loss term and clip-higher on for the group-style modes. Non-zero
    advantages and old log-probs shifted so that some ratios are clipped; ptx on.

    ``by_tokens``: also 2 ranks with ``ppo.micro_batch_tokens`` (docs/design.md, "Token-budget micro-batches
    (issue 17)"), DeepSpeed told 1 micro-batch per step while the plan has 2 (rank 0 packed to 1, split to
    the other rank's 2; each cut to its real columns): the same log-probs from the packed no-grad pass, the
    same step."""
    from cluster.placement import release
    from trainers.ppo.metrics import sum_over_ranks

    batch = data["batch"]
    fields = {"loss_agg": loss_agg, **extra}
    wide, wide_pg = start_policy(
        ray_local, sft_model_dir, world=2, grad_accum=1, name="test-agg-2x1", **fields
    )
    deep, deep_pg = start_policy(
        ray_local, sft_model_dir, world=1, grad_accum=2, name="test-agg-1x2", **fields
    )
    groups = [(wide, wide_pg), (deep, deep_pg)]
    if by_tokens:
        budget = _rank_budget(batch, WORLD)
        packed, packed_pg = start_policy(
            ray_local, sft_model_dir, WORLD, 1, "test-agg-tokens", micro_batch_tokens=budget, **fields
        )
        groups.append((packed, packed_pg))
    try:
        g = torch.Generator().manual_seed(0)
        mask = batch.tokens.response_mask.float()
        policy_logprobs = _old_logprobs(ray_local, wide, batch)
        old = policy_logprobs + 0.3 * torch.randn(mask.shape, generator=g) * mask
        advantages = torch.randn(mask.shape, generator=g) * mask
        ref = policy_logprobs + 0.2 * torch.randn(mask.shape, generator=g) * mask if extra else None
        args = (batch, old, data["ptx_rows"], data["pad"], advantages, ref, loss_agg)
        wide_stats = sum_over_ranks(_train(ray_local, wide, *args))[0]
        deep_stats = sum_over_ranks(_train(ray_local, deep, *args))[0]
        assert wide_stats["max_grad_norm"] > 0
        assert wide_stats["max_grad_norm"] == pytest.approx(deep_stats["max_grad_norm"], rel=1e-5)
        keys = ("loss_sum", "clip_sum", "ptx_sum", "tokens") + ("kl_loss_sum",) * bool(extra)
        for key in keys:
            assert wide_stats[key] == pytest.approx(deep_stats[key], rel=1e-5), key
        assert wide_stats["clip_sum"] > 0  # the clipped branch is exercised
        a, b = _state(ray_local, wide), _state(ray_local, deep)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
        if by_tokens:
            torch.testing.assert_close(
                _old_logprobs(ray_local, packed, batch), policy_logprobs, rtol=0, atol=1e-5
            )
            packed_stats = sum_over_ranks(_train(ray_local, packed, *args, budget=budget))[0]
            assert packed_stats["skipped"] == 0
            for key in ("max_grad_norm", *keys):
                assert packed_stats[key] == pytest.approx(wide_stats[key], rel=1e-5), key
            # Other shapes, other fp32 rounding; AdamW's first step moves each weight by about lr x the
            # sign of its gradient, so where a gradient is ~0 that rounding shows: seen 8e-6 at lr 1e-3.
            c = _state(ray_local, packed)
            assert all(torch.allclose(c[k], a[k], rtol=0, atol=2e-5) for k in a)
    finally:
        for group, pg in groups:
            group.kill()
            release(pg)


def test_checkpointing_offload_and_chunked_logprobs_give_the_plain_step(ray_local, sft_model_dir, data):
    """docs/design.md "Memory (issue 17)": one optimizer step (1 rank x 2 micro-batches, ptx and clipping
    on) with gradient checkpointing, or with ZeRO-3 parameter + optimizer offload (real DeepSpeed on the
    CPU), or with log-probs in chunks of 3 positions, gives the plain step's log-probs, losses, gradient
    norm and weights. The plain step uses whole-row log-probs (``logprob_chunk_size=0``)."""
    from cluster.placement import release
    from trainers.ppo.metrics import sum_over_ranks

    batch = data["batch"]
    variants = {
        "plain": {"logprob_chunk_size": 0},
        "checkpointing": {"gradient_checkpointing": True, "logprob_chunk_size": 0},
        "offload": {"offload_params": True, "offload_optimizer": True, "logprob_chunk_size": 0},
        "chunked": {"logprob_chunk_size": 3},
    }
    results = {}
    for label, fields in variants.items():
        group, pg = start_policy(
            ray_local, sft_model_dir, world=1, grad_accum=2, name=f"test-mem-{label}", **fields
        )
        try:
            policy_logprobs = _old_logprobs(ray_local, group, batch)
            g = torch.Generator().manual_seed(0)
            mask = batch.tokens.response_mask.float()
            old = policy_logprobs + 0.3 * torch.randn(mask.shape, generator=g) * mask
            advantages = torch.randn(mask.shape, generator=g) * mask
            args = (batch, old, data["ptx_rows"], data["pad"], advantages)
            stats = sum_over_ranks(_train(ray_local, group, *args))[0]
            results[label] = (group.build_facts[0], policy_logprobs, stats, _state(ray_local, group))
        finally:
            group.kill()
            release(pg)
    facts, logprobs, stats, state = results.pop("plain")
    assert facts["checkpointed_modules"] == 0 and stats["max_grad_norm"] > 0 and stats["clip_sum"] > 0
    assert results["checkpointing"][0]["checkpointed_modules"] >= 2  # the tiny model's decoder layers
    for label, (_facts, other_logprobs, other_stats, other_state) in results.items():
        torch.testing.assert_close(other_logprobs, logprobs, rtol=0, atol=1e-6, msg=label)
        for key in ("loss_sum", "clip_sum", "ptx_sum", "entropy_sum", "max_grad_norm"):
            assert other_stats[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7), (label, key)
        assert all(torch.allclose(other_state[k], state[k], atol=1e-6) for k in state), label


def test_typed_batches_and_plans_cross_ray_unchanged(ray_local, data):
    """The dataclasses the driver sends (Experience, RankPlan with ptx micro-batches) arrive in another
    worker process with every tensor's dtype, shape and values intact."""
    import dataclasses

    batch = data["batch"]
    old = torch.randn(batch.tokens.response_mask.shape, generator=torch.Generator().manual_seed(1))
    experience = _experience(batch, old, advantages=old * 2)
    plan = _plans(batch, WORLD, data["ptx_rows"], data["pad"])[1]

    @ray_local.remote(num_cpus=0)
    def echo(*items):
        return items

    back_exp, back_plan = ray_local.get(echo.remote(experience, plan))

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            return {prefix: obj}
        if dataclasses.is_dataclass(obj):
            return {
                k: v
                for f in dataclasses.fields(obj)
                for k, v in tensors(getattr(obj, f.name), f"{prefix}.{f.name}").items()
            }
        if isinstance(obj, list):
            return {k: v for i, item in enumerate(obj) for k, v in tensors(item, f"{prefix}[{i}]").items()}
        return {}

    for sent, got in ((experience, back_exp), (plan, back_plan)):
        assert type(got) is type(sent)
        want, have = tensors(sent), tensors(got)
        assert want and set(have) == set(want)
        for key, tensor in want.items():
            assert have[key].dtype == tensor.dtype and have[key].shape == tensor.shape, key
            assert torch.equal(have[key], tensor), key
    assert back_plan.first_step == 1 and back_plan.steps[0].ptx_tokens == plan.steps[0].ptx_tokens
    assert back_exp.tokens.sequences.dtype == torch.long and back_exp.advantages.dtype == torch.float32
