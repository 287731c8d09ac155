"""trainers.runtime.models on CPU without Ray or DeepSpeed: building, dropout, left padding, reward scores,
saving."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from trainers.config import tokenizer_dir
from trainers.errors import ConfigError
from trainers.runtime.export import save_hf
from trainers.runtime.models import (
    REWARD_BIAS_KEY,
    build_causal_lm,
    build_reward_model,
    build_value_model,
    check_model_dir,
    forward_logits,
    no_dropout_updates,
    prepare_for_training,
    reward_scores,
    set_dropout,
    token_scores,
    token_values,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from trainers.data.tokenizer import train_tokenizer

    texts = [f"The cat number {i} sits on the mat and eats {i % 7} red apples." for i in range(200)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    """A tiny causal LM saved with save_hf (no distributed group: GatheredParameters is a no-op)."""
    model = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=0)
    out = tmp_path_factory.mktemp("lm") / "model"
    save_hf(model, tokenizer, out, config_updates=no_dropout_updates(model.config))
    return out


def _cfg(**sections):
    base = {"model": {"tokenizer": None, "path": None}, "data": {"dir": None}}
    for name, values in sections.items():
        base[name] |= values
    return types.SimpleNamespace(**{k: types.SimpleNamespace(**v) for k, v in base.items()})


def test_tokenizer_dir_precedence(tmp_path, lm_dir):
    assert tokenizer_dir(_cfg(model={"tokenizer": "/t"}, data={"dir": "/d"})) == type(lm_dir)("/t")
    assert tokenizer_dir(_cfg(model={"path": str(lm_dir)}, data={"dir": "/d"})) == lm_dir
    assert tokenizer_dir(_cfg(model={"path": str(tmp_path)}, data={"dir": "/d"})) == type(lm_dir)(
        "/d/tokenizer"
    )
    with pytest.raises(ConfigError, match="no tokenizer"):
        tokenizer_dir(_cfg())


def test_check_model_dir_requires_config_and_safetensors(tmp_path, lm_dir):
    assert check_model_dir(lm_dir) == lm_dir
    with pytest.raises(ConfigError, match="not set"):
        check_model_dir(None)
    with pytest.raises(ConfigError, match="missing' does not exist"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="file' is not a directory"):
        check_model_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="no .safetensors"):
        check_model_dir(tmp_path)


def test_check_model_dir_options_stage_output_and_tokenizer(tmp_path, lm_dir):
    """Evaluation's variant: a stage output directory resolves to its model/, tokenizer.json required."""
    assert check_model_dir(lm_dir.parent, "--policy", stage_output=True) == lm_dir
    with pytest.raises(ConfigError, match="--policy='.*' has no config.json"):
        check_model_dir(lm_dir.parent, "--policy")  # without the option the run directory is not a model
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_model_dir(tmp_path) == tmp_path
    with pytest.raises(ConfigError, match="--policy='.*' has no tokenizer.json"):
        check_model_dir(tmp_path, "--policy", need_tokenizer=True)


def test_set_dropout_touches_only_dropout_fields(tokenizer):
    from trainers.runtime.presets import build_config

    config = build_config("tiny", tokenizer)
    assert set_dropout(config, 0.2) == ["attention_dropout"]  # Llama has no residual dropout field
    assert config.attention_dropout == 0.2
    assert no_dropout_updates(config) == {"attention_dropout": 0.0}


def test_random_init_is_seeded(tokenizer):
    a = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=1)
    b = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=1)
    c = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=2)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == len(tokenizer) and a.config.pad_token_id == tokenizer.pad_token_id


def test_saved_lm_loads_with_transformers_and_matches(lm_dir, tokenizer):
    assert (lm_dir / "model.safetensors").is_file() and (lm_dir / "tokenizer.json").is_file()
    assert not lm_dir.with_name("model.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(lm_dir, use_safetensors=True)
    again = build_causal_lm(path=lm_dir, dropout=0.3)
    assert again.config.attention_dropout == 0.3
    for (name, p), q in zip(loaded.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_forward_logits_left_padding_matches_unpadded(lm_dir):
    model = build_causal_lm(path=lm_dir).eval()
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    alone = forward_logits(model, ids, torch.ones_like(ids))  # (1, 5, V)
    padded = torch.tensor([[0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    both = forward_logits(model, padded, mask)  # (2, 7, V)
    torch.testing.assert_close(both[0, 2:], alone[0], rtol=1e-4, atol=1e-4)


def test_reward_model_keeps_the_sft_trunk_and_starts_a_small_head(lm_dir, tokenizer):
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    rm = build_reward_model(lm_dir, tokenizer.pad_token_id, seed=0)
    torch.testing.assert_close(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    torch.testing.assert_close(
        rm.model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight
    )
    assert not hasattr(rm, "lm_head")
    w = rm.score.weight  # (1, d)
    d = w.shape[-1]
    assert w.shape == (1, d) and rm.score.bias is None
    assert float(w.detach().std()) == pytest.approx(
        1 / (d + 1) ** 0.5, rel=0.25
    )  # docs/ppo_details.md item 10, not 0.02
    assert getattr(rm.config, REWARD_BIAS_KEY) == 0.0
    again = build_reward_model(lm_dir, tokenizer.pad_token_id, seed=0)
    assert torch.equal(again.score.weight, w)


def test_reward_scores_read_the_last_real_token_and_add_the_bias(lm_dir, tokenizer):
    rm = build_reward_model(lm_dir, tokenizer.pad_token_id).eval()
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        scores = reward_scores(rm, ids, mask)  # (2,)
        alone = reward_scores(rm, torch.tensor([[11, 12, 13]]), torch.ones(1, 3, dtype=torch.long))
        pooled = rm(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
        setattr(rm.config, REWARD_BIAS_KEY, 1.5)
        shifted = reward_scores(rm, ids, mask)
    torch.testing.assert_close(scores[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, pooled.squeeze(-1))  # same as transformers' own pooling here
    torch.testing.assert_close(shifted, scores + 1.5)


def test_reward_scores_use_the_mask_not_pad_ids(lm_dir, tokenizer):
    """A real last token that happens to equal the PAD id: transformers' pooling would skip it."""
    rm = build_reward_model(lm_dir, tokenizer.pad_token_id).eval()
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad, 11, 12, pad]])
    mask = torch.tensor([[0, 1, 1, 1]])
    with torch.no_grad():
        per_token = token_scores(rm, ids, mask)  # (1, 4)
        scores = reward_scores(rm, ids, mask)
    assert per_token.shape == (1, 4)
    torch.testing.assert_close(scores, per_token[:, 3])
    assert not torch.allclose(scores, per_token[:, 2])


def test_saved_reward_model_round_trips_with_its_bias(tmp_path, lm_dir, tokenizer):
    rm = build_reward_model(lm_dir, tokenizer.pad_token_id)
    save_hf(rm, tokenizer, tmp_path / "rm", config_updates={REWARD_BIAS_KEY: -0.75})
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", use_safetensors=True)
    assert loaded.config.reward_bias == -0.75 and loaded.config.num_labels == 1
    torch.testing.assert_close(loaded.score.weight, rm.score.weight)
    critic = build_value_model(tmp_path / "rm")
    torch.testing.assert_close(critic.score.weight, rm.score.weight)
    ids, mask = torch.tensor([[3, 11, 12]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        scores = reward_scores(loaded, ids, mask)
        torch.testing.assert_close(scores, token_scores(loaded, ids, mask)[:, -1] - 0.75)
        torch.testing.assert_close(
            scores, reward_scores(rm.eval(), ids, mask)
        )  # save_hf updated the live config too


def test_critic_starts_with_the_rm_bias_its_last_token_value_is_the_score(tmp_path, lm_dir, tokenizer):
    """docs/ppo_details.md item 30: before any update the critic's value at each row's last real token equals
    the RM's score (``reward_bias`` included), and every value carries the bias."""
    rm = build_reward_model(lm_dir, tokenizer.pad_token_id, seed=3)
    save_hf(rm, tokenizer, tmp_path / "rm", config_updates={REWARD_BIAS_KEY: 1.25})
    critic = build_value_model(tmp_path / "rm").eval()  # the critic actor's loader
    reward = build_value_model(tmp_path / "rm").eval()  # the reward actor's loader
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad, pad, 11, 12, 13, pad], [21, 22, 23, 24, 25, 26], [pad, 31, 32, 33, 34, pad]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        values = token_values(critic, ids, mask)  # (3, 6)
        scores = reward_scores(reward, ids, mask)  # (3,)
        raw = token_scores(critic, ids, mask)  # (3, 6)
    last = torch.tensor([4, 5, 4])
    torch.testing.assert_close(values[torch.arange(3), last], scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, raw + 1.25)
    # the head alone would be off by the bias (what the critic started from before item 30)
    torch.testing.assert_close(scores - raw[torch.arange(3), last], torch.full((3,), 1.25))


def _step_with_layer_calls(model, ids, mask):
    """Loss, parameter gradients and decoder-layer calls of one forward + backward. Pre-hooks count the
    calls: torch's checkpoint stops a recomputation once it has what backward needs, before any
    forward hook would run."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    try:
        logits = forward_logits(model, ids, mask)  # (B, T, V)
        loss = torch.log_softmax(logits.float(), -1)[..., 5].mean()
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


def test_checkpointing_recomputes_layers_in_eval_mode_with_dropout_off(tokenizer):
    """docs/design.md "Memory (issue 17)": the PPO actors' set-up (eval mode) still recomputes every
    decoder layer in backward, gives the plain step's loss and gradients, and keeps dropout off (the
    model is built with attention dropout 0.5, which would make two passes differ)."""
    ids = torch.tensor([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    plain = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=3, dropout=0.5)
    ckpt = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=3, dropout=0.5)
    assert prepare_for_training(plain, False, eval_mode=True) == 0
    n_layers = len(ckpt.model.layers)
    assert prepare_for_training(ckpt, True, eval_mode=True) >= n_layers
    assert all(layer.training for layer in ckpt.model.layers)
    assert not any(layer.self_attn.training or layer.mlp.training for layer in ckpt.model.layers)
    assert not ckpt.training and not plain.training

    loss_p, grads_p, calls_p = _step_with_layer_calls(plain, ids, mask)
    loss_c, grads_c, calls_c = _step_with_layer_calls(ckpt, ids, mask)
    assert calls_p == n_layers and calls_c == 2 * n_layers  # each layer run again in backward
    assert loss_c == pytest.approx(loss_p, abs=1e-6)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    again, *_ = _step_with_layer_calls(ckpt, ids, mask)
    assert again == loss_c  # dropout off: the same pass gives the same loss


def test_checkpointing_in_train_mode_for_the_stages(tokenizer):
    """The stages' use (train mode, dropout as configured): layers are recomputed as well."""
    model = build_causal_lm(preset="tiny", tokenizer=tokenizer, seed=3).train()
    assert prepare_for_training(model, True) >= len(model.model.layers)
    ids = torch.tensor([[11, 12, 13, 14]])
    *_, calls = _step_with_layer_calls(model, ids, torch.ones_like(ids))
    assert calls == 2 * len(model.model.layers)
