"""The vLLM rollout actor on the CPU build, inside Ray: sampling from token ids, seeds, weight sync.

One engine serves the whole module (start-up is the expensive part). It is started from model A;
the weight-sync test then pushes model B (A with perturbed weights) through ``CpuBlobSync`` and
checks vLLM's log-probs against a transformers forward of B (docs/ppo_details.md item 26). A second
engine joins it for the broadcast transport's test (``BroadcastSync``, gloo: a group of three ranks).
"""

from __future__ import annotations

import random

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from actors.rollout import RolloutEngine, request_seeds
from cluster.actor_group import ActorGroup
from cluster.placement import place_roles, release
from cluster.weight_sync import BroadcastSync, CpuBlobSync, iter_buckets, tensor_bytes
from trainers.algos.logprobs import logprobs_from_logits, shift_for_lm
from trainers.data.collate import left_pad, position_ids_from_mask
from trainers.data.tokenizer import train_tokenizer
from trainers.runtime.presets import build_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EOS, BOS, PAD = 2, 1, 0
FIRST_WORD_ID = 5  # ids 0..4 are special tokens
STOP_IDS = (EOS, 11)
"""The engine's stop set: EOS and a word id, standing in for a model with several stop ids (item 28)."""
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Model A (random tiny Llama, tied embeddings, head_dim 64) and model B = A + noise, both with
    tokenizer."""
    root = tmp_path_factory.mktemp("models")
    texts = [f"the fox {i} jumps over {i * 7} lazy dogs and cats" for i in range(300)]
    tok = train_tokenizer(texts, root / "tok", vocab_size=320)
    config = build_config("tiny", tok)
    torch.manual_seed(0)
    model_a = LlamaForCausalLM(config).float()
    model_a.save_pretrained(root / "a")
    tok.save_pretrained(root / "a")
    model_b = LlamaForCausalLM(config).float()
    model_b.load_state_dict(model_a.state_dict())
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_b.save_pretrained(root / "b")
    return {"a": root / "a", "b": root / "b", "vocab": len(tok)}


def start_engine(run_name: str, model_dirs) -> tuple:
    """One RolloutEngine actor (CPU bundle, named ``<run_name>-rollout-0``) started from model A; with its
    placement groups. Returns (actor, group, placements)."""
    placements = place_roles({"rollout": [{"CPU": 1.0}]}, colocated=False, timeout_s=60, name=run_name)
    group = ActorGroup(
        RolloutEngine,
        placements["rollout"],
        run_name=run_name,
        init_args=(str(model_dirs["a"]),),
        init_kwargs={
            "device": "cpu",
            "dtype": "float32",
            "kv_cache_memory_bytes": 128 * 2**20,
            "max_model_len": 256,
            "eos_token_ids": list(STOP_IDS),
        },
        rank_kwargs=lambda rank: {"seed": 1000 + rank},
    )
    health = ray.get(group.actors[0].health.remote())
    print(f"vLLM engine start-up ({run_name}): {health['startup_s']} s")
    return group.actors[0], group, placements


@pytest.fixture(scope="module")
def engine(ray_local, model_dirs):
    """One RolloutEngine actor (CPU bundle, named ``test-rollout-0``), started from model A, stopping on
    ``STOP_IDS`` as the PPO driver's engines stop on the run's stop set."""
    actor, group, placements = start_engine("test", model_dirs)
    yield actor
    group.kill()
    release(placements)


@pytest.fixture(scope="module")
def second_engine(ray_local, model_dirs):
    """A second engine like :func:`engine` (``test2-rollout-0``): the broadcast test's group of two."""
    actor, group, placements = start_engine("test2", model_dirs)
    yield actor
    group.kill()
    release(placements)


def make_prompts(vocab: int, count: int, seed: int = 0, lengths=(3, 10)) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [BOS] + [rng.randrange(FIRST_WORD_ID, vocab) for _ in range(rng.randint(*lengths))]
        for _ in range(count)
    ]


def hf_response_logprobs(model, prompts, outputs, temperature: float) -> list[torch.Tensor]:
    """Log-probs of each response's tokens under a transformers model: left-padded batch,
    ``position_ids = cumsum(mask) - 1``, logits divided by the temperature (docs/ppo_details.md item 1, 3)."""
    seqs = [prompts[o["prompt_index"]] + o["token_ids"] for o in outputs]
    input_ids, mask = left_pad(seqs, PAD)  # (B, W)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    logp = logprobs_from_logits(*shift_for_lm(logits, input_ids), temperature=temperature)  # (B, W-1)
    width = input_ids.shape[1]
    return [logp[b, width - 1 - len(o["token_ids"]) :] for b, o in enumerate(outputs)]


def max_abs_diff(a: list[torch.Tensor], b: list[list[float]]) -> float:
    return max((x - torch.tensor(y)).abs().max().item() for x, y in zip(a, b, strict=True))


def sampling(max_new_tokens=64, n=1, temperature=1.0):
    return {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0, "top_k": -1}


def test_generate_ends_at_a_stop_id_or_max_tokens(engine, model_dirs):
    """vLLM stops at the first of any stop id, and the driver's cut and truncation flags agree with its
    finish reasons (docs/ppo_details.md item 28, 29)."""
    from trainers.ppo.batch import build_rollout_batch, cut_at_stop

    prompts = make_prompts(model_dirs["vocab"], 8)
    out = ray.get(engine.generate.remote(prompts, sampling(max_new_tokens=64, n=4), 7))
    assert [o["prompt_index"] for o in out] == [i for i in range(8) for _ in range(4)]
    assert ray.get(engine.health.remote())["eos_token_ids"] == list(STOP_IDS)
    for o in out:
        ids = o["token_ids"]
        assert len(o["logprobs"]) == len(ids) and all(lp <= 0 for lp in o["logprobs"])
        assert cut_at_stop(ids, STOP_IDS) == ids  # nothing sampled after a stop id
        if o["finish_reason"] == "stop":
            assert ids[-1] in STOP_IDS and len(ids) <= 64
        else:
            assert o["finish_reason"] == "length" and len(ids) == 64 and not set(STOP_IDS) & set(ids)
    reasons = {o["finish_reason"] for o in out}
    assert reasons == {"stop", "length"}, reasons  # near-uniform tiny model: P(stop) ~ 2/320 per token
    assert {o["token_ids"][-1] for o in out if o["finish_reason"] == "stop"} == set(STOP_IDS)  # both stop
    rollout = build_rollout_batch(
        [prompts[o["prompt_index"]] for o in out],
        [o["token_ids"] for o in out],
        PAD,
        STOP_IDS,
        finish_reasons=[o["finish_reason"] for o in out],
    )
    assert rollout.truncated.tolist() == [o["finish_reason"] == "length" for o in out]
    # the n samples of one prompt are different draws
    assert len({tuple(o["token_ids"]) for o in out[:4]}) > 1


def test_out_of_vocabulary_ids_are_refused_and_engine_survives(engine, model_dirs):
    with pytest.raises(ray.exceptions.RayTaskError, match="outside the vocabulary"):
        ray.get(engine.generate.remote([[BOS, model_dirs["vocab"] + 3]], sampling(max_new_tokens=4)))
    assert len(ray.get(engine.generate.remote([[BOS, 7]], sampling(max_new_tokens=4), 0))) == 1


def test_same_seed_same_samples_other_seed_other_samples(engine, model_dirs):
    prompts = make_prompts(model_dirs["vocab"], 4, seed=1)
    first, again, other = ray.get(
        [
            engine.generate.remote(prompts, sampling(max_new_tokens=16, n=2), 11),
            engine.generate.remote(prompts, sampling(max_new_tokens=16, n=2), 11),
            engine.generate.remote(prompts, sampling(max_new_tokens=16, n=2), 12),
        ]
    )
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again]
    assert sum(a["token_ids"] != b["token_ids"] for a, b in zip(first, other, strict=True)) >= 6
    # a prompt's samples depend only on its own seed, not on what else is in the batch
    alone = ray.get(
        engine.generate.remote(prompts[2:3], sampling(max_new_tokens=16, n=2), request_seeds(11, 4, 2)[2])
    )
    assert [o["token_ids"] for o in alone] == [o["token_ids"] for o in first[4:6]]


def test_weight_sync_then_logprobs_match_transformers(engine, model_dirs):
    model_a = AutoModelForCausalLM.from_pretrained(model_dirs["a"], dtype=torch.float32).eval()
    model_b = AutoModelForCausalLM.from_pretrained(model_dirs["b"], dtype=torch.float32).eval()
    # Longer than vLLM's 16-token KV block, so the prefix cache holds full blocks of these prompts.
    prompts = make_prompts(model_dirs["vocab"], 6, seed=2, lengths=(33, 50))
    params = sampling(max_new_tokens=24, n=2, temperature=TEMPERATURE)

    before = ray.get(engine.generate.remote(prompts, params, 5))
    diff_a = max_abs_diff(
        hf_response_logprobs(model_a, prompts, before, TEMPERATURE), [o["logprobs"] for o in before]
    )
    assert diff_a < 1e-3, f"vLLM and transformers disagree on model A already: {diff_a}"

    # The test driver plays the policy's rank 0: full HF-named state dict (tied lm_head included).
    sync = CpuBlobSync([engine], bucket_bytes=64 * 1024)
    state = model_b.state_dict()
    stats = sync.push(state.items())
    assert stats["tensors"] == len(state) and stats["buckets"] > 3
    print(f"weight sync: {stats}")

    after = ray.get(
        engine.generate.remote(prompts, params, 5)
    )  # same prompts: a stale prefix cache would show
    vllm_lp = [o["logprobs"] for o in after]
    diff_b = max_abs_diff(hf_response_logprobs(model_b, prompts, after, TEMPERATURE), vllm_lp)
    diff_vs_a = max_abs_diff(hf_response_logprobs(model_a, prompts, after, TEMPERATURE), vllm_lp)
    print(f"max |vLLM - HF| log-prob after sync: {diff_b:.2e} (vs old model A: {diff_vs_a:.2e})")
    assert diff_b < 1e-3
    assert diff_vs_a > 100 * max(diff_b, 1e-4)

    sequences = [prompts[o["prompt_index"]] + o["token_ids"] for o in after[:4]]
    prompt_lp = ray.get(engine.prompt_logprobs.remote(sequences))
    ids, mask = left_pad(sequences, PAD)
    with torch.no_grad():
        logits = model_b(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    hf = logprobs_from_logits(*shift_for_lm(logits, ids))  # (B, W-1), T = 1
    hf_rows = [hf[b, ids.shape[1] - len(s) :] for b, s in enumerate(sequences)]
    assert max_abs_diff(hf_rows, prompt_lp) < 1e-3


def bf16_exact(model: torch.nn.Module, names: set[str]) -> None:
    """Round the named parameters of an fp32 model to bfloat16 values in place: sending them as bf16
    then loses nothing, so log-probs after a mixed-dtype sync must still match the fp32 model exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.copy_(p.to(torch.bfloat16).float())


def test_broadcast_sync_into_two_engines_with_mixed_dtypes_then_logprobs_match_transformers(
    engine, second_engine, model_dirs
):
    """The gloo broadcast transport, as the policy's rank 0 uses it: model C (B + noise; norms and layer
    0's MLP rounded to bf16 and sent as bf16) into two engines at once -- one already updated by the blob
    test, one fresh -- in 256 KiB buckets, several in flight, buckets mixing fp32 and bf16 buffers. Both
    engines' log-probs then equal a transformers forward of C, and a second push reuses the group."""
    model_c = AutoModelForCausalLM.from_pretrained(model_dirs["b"], dtype=torch.float32).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model_c.state_dict()
    as_bf16 = {n for n in state if "norm" in n or "layers.0.mlp" in n}
    bf16_exact(model_c, as_bf16)
    named = [(n, t.to(torch.bfloat16) if n in as_bf16 else t) for n, t in model_c.state_dict().items()]
    buckets = list(iter_buckets(named, 256 * 1024))
    assert sum(len({t.dtype for _, t in b}) > 1 for b in buckets) >= 2  # mixed-dtype buckets

    sync = BroadcastSync(
        [engine, second_engine], ray.util.get_node_ip_address(), 0, backend="gloo", bucket_bytes=256 * 1024
    )
    stats = sync.push(named)
    print(f"broadcast sync: {stats}")
    assert stats["tensors"] == len(state) and stats["buckets"] == len(buckets) > sync.max_inflight_buckets
    assert stats["group_setup"] == 1 and stats["bytes"] == sum(tensor_bytes(t) for _, t in named)

    prompts = make_prompts(model_dirs["vocab"], 6, seed=4, lengths=(33, 50))
    params = sampling(max_new_tokens=24, n=2, temperature=TEMPERATURE)
    for actor in (engine, second_engine):
        out = ray.get(actor.generate.remote(prompts, params, 6))
        diff = max_abs_diff(
            hf_response_logprobs(model_c, prompts, out, TEMPERATURE), [o["logprobs"] for o in out]
        )
        print(f"max |vLLM - HF| log-prob after broadcast sync: {diff:.2e}")
        assert diff < 1e-3

    again = sync.push(named)  # the same group carries the next push
    assert again["group_setup"] == 0 and again["group_setups"] == 1 and again["tensors"] == len(state)
    assert [ray.get(a.health.remote())["weight_groups"] for a in (engine, second_engine)] == [1, 1]
    sync.close()


def test_sleep_and_wake_are_no_ops_on_cpu(engine):
    assert ray.get(engine.sleep.remote()) is False
    assert ray.get(engine.wake_up.remote()) is False
    assert ray.get(engine.health.remote())["sleeping"] is False
