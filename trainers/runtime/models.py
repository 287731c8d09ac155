"""Models of the pipeline: the causal LM (base, SFT, policy), the reward model and the value model.

All are plain transformers classes, so every saved directory loads with ``AutoModelFor...`` as is
(and the causal LMs with vLLM). Weights are read from safetensors only (``use_safetensors=True``);
model code shipped with a checkpoint runs only with ``model.trust_remote_code: true``.

Decisions recorded here:

- **Left padding everywhere** (docs/ppo_details.md item 1): :func:`forward_logits` and :func:`token_scores`
  always pass ``position_ids = cumsum(attention_mask) - 1`` so a row's first real token is at
  position 0 whatever its padding.
- **Dropout** (``model.dropout``, training only): Llama and Qwen2 in transformers have dropout on
  the attention probabilities only (``attention_dropout``) and no residual dropout, so on those
  architectures ``model.dropout`` is attention dropout. Architectures with residual/hidden dropout
  fields (``resid_pdrop``, ``hidden_dropout``, ``dropout``...) get it there too (:data:`DROPOUT_KEYS`).
  Saved models always have every dropout field reset to 0 (:func:`no_dropout_updates`): dropout is a
  setting of the stage that trained them, and RL wants it off (docs/ppo_details.md item 22).
- **Reward model** (docs/ppo_details.md item 7, 9, 10): ``AutoModelForSequenceClassification`` with
  ``num_labels=1`` built from the SFT directory; the trunk's weights are the SFT model's and the
  unembedding is dropped (the class has none), the scalar head ``score`` starts
  ``normal(0, 1/sqrt(d + 1))``. The score is read at the **last real token** found from the
  attention mask (not from PAD ids), from the per-token head outputs (:func:`token_scores`).
- **Reward bias**: transformers' sequence-classification heads have no bias
  (``GenericForSequenceClassification.score`` is ``nn.Linear(..., bias=False)``), so the InstructGPT
  normalisation bias (demonstrations' mean score = 0, docs/ppo_details.md item 9) is stored in the saved
  model's ``config.json`` as ``reward_bias`` (a float, default 0.0) and added by
  :func:`reward_scores`. Plain transformers users add ``model.config.reward_bias`` to the logits.
- **Value model** (docs/ppo_details.md item 23, 30): the same class loaded from the RM directory; per-token
  values are :func:`token_values`, the head's output **plus** ``reward_bias``, so before any update the
  critic's value at a sequence's last real token is exactly the RM's (normalised) score, and its values
  start on the scale of the returns. The bias stays a constant read from the RM directory's
  ``config.json`` rather than a new trainable parameter: the class's head has none (adding one to a
  ZeRO-3-partitioned model means converting it by hand, and the critic would no longer be the RM's
  class), the trainable function is the RM's as before, and a resumed critic (rebuilt from the same RM
  directory, then its DeepSpeed checkpoint loaded) gets the same constant.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.algos import last_token_index
from trainers.data.collate import position_ids_from_mask
from trainers.errors import ConfigError
from trainers.runtime.zero import gathered

REWARD_BIAS_KEY = "reward_bias"
"""config.json field holding the reward model's additive score bias (see the module docstring)."""

DROPOUT_KEYS: tuple[str, ...] = (
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)
"""Config fields that hold a dropout probability in transformers architectures."""


# --------------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------------


def check_model_dir(
    path: str | Path | None,
    key: str = "model.path",
    *,
    stage_output: bool = False,
    need_tokenizer: bool = False,
) -> Path:
    """The model directory ``path`` names, checked to hold ``config.json`` and safetensors weights.

    The one model-directory check of the project (stages, PPO and evaluation). ``key`` names where
    the path came from in every message (``model.path``, ``--policy``). With ``stage_output`` a stage's
    output directory is accepted too and its ``model/`` is returned; ``need_tokenizer`` also requires
    ``tokenizer.json`` (evaluation reads the tokenizer saved with the model). Raises
    :class:`ConfigError` (one line) when anything is missing.
    """
    if not path:
        raise ConfigError(f"{key} is not set: give the model directory to start from")
    p = Path(path)
    if stage_output and (p / "model" / "config.json").is_file():
        p = p / "model"
    if not p.exists():
        raise ConfigError(f"{key}='{p}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"{key}='{p}' is not a directory")
    if not (p / "config.json").is_file():
        also = " or a stage output directory holding model/" if stage_output else ""
        raise ConfigError(
            f"{key}='{p}' has no config.json (expected a Hugging Face save_pretrained directory{also})"
        )
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"{key}='{p}' holds no .safetensors weights (only safetensors are loaded)")
    if need_tokenizer and not (p / "tokenizer.json").is_file():
        raise ConfigError(
            f"{key}='{p}' has no tokenizer.json (stage outputs save the tokenizer with the model)"
        )
    return p


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def set_dropout(config, p: float) -> list[str]:
    """Set every dropout field that ``config`` has (:data:`DROPOUT_KEYS`) to ``p``; return their names."""
    names = [k for k in DROPOUT_KEYS if isinstance(getattr(config, k, None), int | float)]
    for name in names:
        setattr(config, name, float(p))
    return names


def no_dropout_updates(config) -> dict[str, float]:
    """``{field: 0.0}`` for every dropout field of ``config``: what a saved model's config gets."""
    return {k: 0.0 for k in DROPOUT_KEYS if isinstance(getattr(config, k, None), int | float)}


def build_causal_lm(
    *,
    preset: str | None = None,
    path: str | Path | None = None,
    tokenizer=None,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """A causal LM: loaded from ``path`` (safetensors), else randomly initialised from ``preset``.

    Call it while a ``HfDeepSpeedConfig`` is alive to get a ZeRO-3-partitioned model. The random
    initialisation is seeded (``seed``); vocabulary and PAD/BOS/EOS come from ``tokenizer``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if path is not None:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        set_dropout(config, dropout)
        return AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    if preset is None:
        raise ConfigError("model: set model.path (a model directory) or model.preset (random initialisation)")
    from trainers.runtime.presets import build_config

    config = build_config(preset, tokenizer)
    set_dropout(config, dropout)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def init_score_head(model, seed: int = 0) -> None:
    """Re-initialise the scalar head: ``normal(0, 1/sqrt(d + 1))`` (docs/ppo_details.md item 10),
    deterministic.

    Works on ZeRO-3-partitioned models (the weight is gathered, set on rank 0 and re-partitioned).
    """
    weight = model.score.weight
    gather = gathered([weight], modifier_rank=0)
    with gather, torch.no_grad():
        d = weight.shape[-1]
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(tuple(weight.shape), generator=g, dtype=torch.float32) / (d + 1) ** 0.5
        weight.copy_(init.to(weight.dtype))


def build_reward_model(
    sft_dir: str | Path,
    pad_token_id: int,
    *,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """The reward model from an SFT directory: SFT trunk + a fresh scalar head, ``reward_bias`` 0.

    See the module docstring (docs/ppo_details.md item 10). The SFT unembedding is not loaded (the
    sequence-classification class has none); transformers logs ``score.weight`` as newly initialised,
    and :func:`init_score_head` then sets it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(
        str(sft_dir), num_labels=1, pad_token_id=pad_token_id, trust_remote_code=trust_remote_code
    )
    set_dropout(config, dropout)
    setattr(config, REWARD_BIAS_KEY, 0.0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(sft_dir), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    init_score_head(model, seed)
    return model


def build_value_model(
    rm_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """The critic (and the frozen RM of the reward actor): the reward model's class and weights from
    ``rm_dir`` (docs/ppo_details.md item 23), dropout off (item 22); its ``config.reward_bias`` comes
    along, which :func:`token_values` adds (item 30)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(rm_dir), trust_remote_code=trust_remote_code)
    set_dropout(config, 0.0)
    return AutoModelForSequenceClassification.from_pretrained(
        str(rm_dir), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def prepare_for_training(module, gradient_checkpointing: bool, *, eval_mode: bool = False) -> int:
    """Set up activation checkpointing (``model.gradient_checkpointing``) on a transformers model before it
    is wrapped by DeepSpeed; returns how many modules checkpoint (0 when off).

    The stages train in train mode. The PPO actors keep every module in eval mode (``eval_mode``; dropout
    off, docs/ppo_details.md item 22), but transformers recomputes a layer only when that layer's own
    ``gradient_checkpointing`` *and* ``training`` are true (``GradientCheckpointingLayer.__call__``; older
    versions tested the decoder stack's flags the same way). So in eval mode exactly the modules that
    carry ``gradient_checkpointing=True`` get ``training=True`` and nothing below them does: the attention
    and dropout modules inside a layer read their own flags and stay in eval mode. Nothing may call
    ``train()``/``eval()`` on the model afterwards, or the flags are reset (docs/design.md, "Memory (issue
    17)"). Non-reentrant ``torch.utils.checkpoint``: it works with DeepSpeed's ZeRO-3 parameter hooks and
    with inputs that do not require grad.
    """
    if gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if eval_mode:
        module.eval()
    holders = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if eval_mode:
        for m in holders:
            m.training = True
    return len(holders)


# --------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return position_ids_from_mask(attention_mask)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, V)`` logits of a causal LM (or its DeepSpeed engine) on left-padded rows."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        use_cache=False,
    )
    return out.logits


def _score_head(model) -> torch.nn.Module:
    module = getattr(model, "module", model)
    head = getattr(module, "score", None)
    if head is None:
        raise TypeError(
            f"{type(module).__name__} has no 'score' head (expected a sequence-classification model)"
        )
    return head


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` scalar-head output at every position, ``reward_bias`` not added (:func:`token_values`
    adds it).

    transformers' forward pools at the last non-PAD id; we need every position (critic) and a
    pooling driven by the attention mask (RM), so a forward hook captures the head's ``(B, T, 1)``
    output while the call still goes through the model's (or DeepSpeed engine's) own forward.
    """
    captured: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask),
            use_cache=False,
        )
    finally:
        handle.remove()
    return captured[-1].squeeze(-1)  # (B, T, 1) -> (B, T)


def reward_bias(model) -> float:
    """The model's ``config.reward_bias`` (0.0 when absent)."""
    module = getattr(model, "module", model)
    return float(getattr(module.config, REWARD_BIAS_KEY, 0.0) or 0.0)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` the head's output + ``reward_bias`` at every position: the critic's values
    (docs/ppo_details.md item 30), and at the last real token the RM's score (:func:`reward_scores`)."""
    return token_scores(model, input_ids, attention_mask) + reward_bias(model)  # (B, T)


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` reward: :func:`token_values` (head output + ``reward_bias``) at each row's last real token
    (by mask)."""
    per_token = token_values(model, input_ids, attention_mask)  # (B, T)
    last = last_token_index(attention_mask)  # (B,)
    if bool((last < 0).any()):
        raise ValueError("reward_scores: a row has no real token")
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last]  # (B,)
