"""Before any actor starts: what the user can get wrong (validation), the run's tokenized inputs, and what
each role is given -- its spec, the rollout engines' arguments, its resource request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actors.specs import ModelSpec, TrainSpec
from cluster.resources import RoleRequest, role_bundles
from trainers.config import Config, PPOConfig, tokenizer_dir
from trainers.config.transport import choose_transport
from trainers.data import kind_paths, read_conversations
from trainers.data.chat import ChatFormat, open_chat_format
from trainers.data.collate import text_windows
from trainers.data.examples import prompt_examples, report_overlong, where_of
from trainers.data.tokenizer import load_tokenizer
from trainers.errors import ConfigError, DataError
from trainers.rewards.function import load_reward_function
from trainers.rewards.http import check_endpoint
from trainers.runs.outdir import check_output_dir
from trainers.runtime.device import resolve_dtype, vllm_dtype
from trainers.runtime.models import check_model_dir
from trainers.runtime.zero import grad_accum_steps


@dataclass
class RunData:
    """Tokenized inputs of a run, built once on the driver during validation."""

    prompts: list[list[int]]
    """Every training prompt in the model's chat format, up to its generation prompt, unpadded."""
    ptx: list[list[int]]
    """Pretraining text windows of at most ``model.max_len`` tokens (empty when ptx is off)."""
    pad_id: int
    """Fills padding only (masks come from lengths), so it may equal a stop id (docs/ppo_details.md item 2)."""
    stop_ids: tuple[int, ...]
    """The run's one stop set (:attr:`trainers.data.chat.ChatFormat.stop_ids`): vLLM stops on it, the driver cuts at its first id,
    ``rollout/eos_rate`` counts it (docs/ppo_details.md item 28)."""
    overlong: dict = field(default_factory=dict)
    """What ``data.overlong`` did to the prompts (``summary.json``'s ``data/overlong``; empty: nothing)."""
    records: list[dict] = field(default_factory=list)
    """The prompt record of each of ``prompts`` (``prompt`` value and extra columns): what a reward
    function or endpoint is given as ``rows``."""
    eval_prompts: list[list[int]] = field(default_factory=list)
    """``ppo.eval_prompts`` held-out prompts (``prompts/valid``) when ``ppo.eval_every`` > 0."""
    eval_records: list[dict] = field(default_factory=list)
    """Their records."""
    tokenizer: object = None
    """The run's tokenizer: the driver decodes responses with it for reward functions and endpoints."""


def encode_prompts(cfg: Config, fmt: ChatFormat, split: str) -> tuple[list[list[int]], list[dict], dict]:
    """Validated ``prompts/<split>`` in the model's chat format (conversation + generation prompt), with
    ``data.overlong`` applied to prompts that leave no room for ``rollout.max_new_tokens`` within
    ``model.max_len`` (dropped by default, counted in a line); returns the prompts, their records and the
    counts for ``summary.json`` (:func:`trainers.data.examples.report_overlong`)."""
    paths = kind_paths(cfg.data, "prompts", split)
    where = where_of(paths, "prompts", split)
    room = cfg.model.max_len - cfg.rollout.max_new_tokens
    room_text = f"model.max_len={cfg.model.max_len} minus rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
    records = read_conversations("prompts", paths)
    encoded, kept, counts = prompt_examples(fmt, records, where, room, cfg.data.overlong, room_text)
    overlong = report_overlong([counts], room_text)
    if not encoded:
        raise DataError(f"{where}: no prompts (of {counts.rows}) fit model.max_len")
    return encoded, [records[i] for i in kept], overlong


def check_reward_sources(cfg: Config) -> None:
    """The PPO rules of the reward sources, before anything starts (docs/design.md, issue 15): at least
    one source; ``gae`` needs the RM (the critic starts from it, docs/ppo_details.md item 23);
    ``reward.weights`` names configured sources only; ``reward.function`` imports and is callable;
    ``reward.url`` answers its health check."""
    r = cfg.reward
    sources = r.sources()
    if not sources:
        raise ConfigError("PPO needs a reward: set reward.path, reward.function or reward.url")
    if cfg.ppo.advantage == "gae" and r.path is None:
        raise ConfigError(
            "ppo.advantage=gae trains a critic that starts from the reward model: set reward.path, or choose a "
            "critic-free ppo.advantage (grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline)"
        )
    for name in r.weights:
        if name not in sources:
            key = {"rm": "reward.path", "function": "reward.function", "url": "reward.url"}[name]
            raise ConfigError(f"reward.weights names '{name}' but {key} is not set")
    if r.function is not None:
        load_reward_function(r.function)
    if r.url is not None:
        check_endpoint(r.url, r.url_timeout_s)


def validate_run(cfg: Config, out_dir: str | os.PathLike) -> tuple[Path, RunData]:
    """Everything the user can get wrong, except resources, checked before anything starts or is
    written: output directory, both model directories (config.json + safetensors), tokenizer and chat
    template (the same tokenizer in the RM directory), the stop ids (:class:`~trainers.data.chat.ChatFormat`:
    end-of-turn, tokenizer EOS, the policy directory's ``eos_token_id`` lists), prompts (held-out ones too
    with ``ppo.eval_every``), with ``ppo.ptx_coef > 0`` the pretraining text, and the reward sources
    (:func:`check_reward_sources`)."""
    out = check_output_dir(out_dir)
    model_dir = check_model_dir(cfg.model.path, "model.path")
    rm_dir = check_model_dir(cfg.reward.path, "reward.path") if cfg.reward.path is not None else None
    tokenizer = load_tokenizer(tokenizer_dir(cfg), cfg.model.chat_template)
    has_rm_tokenizer = rm_dir is not None and (rm_dir / "tokenizer.json").is_file()
    rm_tokenizer = load_tokenizer(rm_dir) if has_rm_tokenizer else None
    if rm_tokenizer is not None and rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"reward.path='{rm_dir}' has another tokenizer than the policy ({tokenizer_dir(cfg)}); the reward "
            "model must read the policy's token ids (docs/ppo_details.md item 7)"
        )
    fmt = open_chat_format(tokenizer, tokenizer_dir(cfg), model_dir)
    prompts, records, overlong = encode_prompts(cfg, fmt, "train")
    eval_prompts: list[list[int]] = []
    eval_records: list[dict] = []
    if cfg.ppo.eval_every > 0:
        eval_prompts, eval_records, _ = encode_prompts(cfg, fmt, "valid")
        eval_prompts, eval_records = (
            eval_prompts[: cfg.ppo.eval_prompts],
            eval_records[: cfg.ppo.eval_prompts],
        )
    ptx: list[list[int]] = []
    if cfg.ppo.ptx_coef > 0:
        texts = read_conversations("pretrain", kind_paths(cfg.data, "pretrain", "train"))
        ptx = text_windows(tokenizer, [r["text"] for r in texts], cfg.model.max_len)
        if not ptx:
            raise DataError("ppo.ptx_coef > 0 but pretrain/train holds no text")
    check_reward_sources(cfg)
    return out, RunData(
        prompts, ptx, fmt.pad_id, fmt.stop_ids, overlong, records, eval_prompts, eval_records, tokenizer
    )


def objective_line(cfg: Config) -> str:
    """What the run optimises, in one line: estimator (and whether a critic trains), where the KL to the
    reference sits, the reward sources with their weights, ptx."""
    p, r = cfg.ppo, cfg.reward
    critic = "with a critic" if p.advantage == "gae" else "no critic"
    kl = [f"in the reward x{p.kl_coef:g}"] * (p.kl_coef > 0) + [f"as a loss x{p.kl_loss_coef:g}"] * (
        p.kl_loss_coef > 0
    )
    sources = " + ".join(f"{name} x{r.weights.get(name, 1.0):g}" for name in r.sources())
    ptx = f", ptx x{p.ptx_coef:g}" if p.ptx_coef > 0 else ""
    return f"advantage {p.advantage} ({critic}), KL {' and '.join(kl) or 'off'}, reward {sources}{ptx}"


def role_specs(cfg: Config, device: str) -> dict:
    """Each DeepSpeed role's :class:`actors.specs.ModelSpec`: only what that actor needs (STYLE).

    Policy and reference start from ``model.path`` (SFT), reward and critic from ``reward.path`` (RM);
    the critic only with ``ppo.advantage=gae``, the reward model only with ``reward.path``.
    """
    p = cfg.ppo
    common = {
        "device": device,
        "dtype": resolve_dtype(cfg.model.dtype, device),
        "zero_stage": p.zero_stage,
        "micro_batch_size": p.micro_batch_size,
        "micro_batch_tokens": p.micro_batch_tokens,
        "temperature": cfg.rollout.temperature,
        "torch_threads": cfg.cluster.torch_threads,
        "seed": p.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
        "logprob_chunk_size": p.logprob_chunk_size,
        "offload_params": p.offload_params,
    }
    sft = str(Path(cfg.model.path).resolve())
    rm = str(Path(cfg.reward.path).resolve()) if cfg.reward.path is not None else None
    train = {
        "weight_decay": p.weight_decay,
        "grad_clip": p.grad_clip,
        "offload_optimizer": p.offload_optimizer,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
    }
    specs = {
        "policy": TrainSpec(
            model_path=sft,
            lr=p.policy_lr,
            grad_accum=_grad_accum(p, p.policy_workers),
            clip_eps=p.clip_eps,
            ptx_coef=p.ptx_coef,
            clip_eps_high=p.clip_eps_high,
            kl_loss_coef=p.kl_loss_coef,
            kl_loss_estimator=p.kl_loss_estimator,
            loss_agg=p.loss_agg,
            tokenizer_path=str(tokenizer_dir_of(cfg)),
            weight_sync=weight_transport(cfg, device),
            rollout_tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            **train,
            **common,
        ),
        "reference": ModelSpec(model_path=sft, **common),
    }
    if p.advantage == "gae":
        specs["critic"] = TrainSpec(
            model_path=rm,
            lr=p.critic_lr,
            grad_accum=_grad_accum(p, p.critic_workers),
            clip_eps=p.value_clip_eps,
            **train,
            **common,
        )
    if rm is not None:
        specs["reward"] = ModelSpec(model_path=rm, **common)
    return specs


def _grad_accum(p: PPOConfig, workers: int) -> int:
    """DeepSpeed's accumulation steps of a trained role: micro-batches per rank per step, or 1 with
    ``ppo.micro_batch_tokens``, whose count varies by step (the actors then mark each step's last
    micro-batch as DeepSpeed's boundary themselves)."""
    if p.micro_batch_tokens > 0:
        return 1
    return grad_accum_steps(p.mini_batch_size, p.micro_batch_size, workers)


def weight_transport(cfg: Config, device: str) -> str:
    """``rollout.weight_sync`` resolved for the run's device and placement
    (``trainers.config.transport.choose_transport``); a choice that does not fit the device ``auto``
    resolved to is a :class:`ConfigError`."""
    try:
        return choose_transport(device, cfg.cluster.placement, cfg.rollout.weight_sync)
    except ValueError as err:  # cluster.device=auto resolved to a device the choice does not fit
        raise ConfigError(str(err)) from None


def tokenizer_dir_of(cfg: Config) -> Path:
    """The run's tokenizer directory, absolute (actors may run elsewhere)."""
    return tokenizer_dir(cfg).resolve()


def rollout_kwargs(cfg: Config, device: str, stop_ids: Sequence[int]) -> dict:
    """Keyword arguments of every :class:`actors.rollout.RolloutEngine` (the seed is added per engine):
    ``stop_ids`` are the run's stop set (``RunData.stop_ids``), so vLLM stops exactly where the driver cuts
    (docs/ppo_details.md item 28); a restarted engine gets the same arguments."""
    dtype = vllm_dtype(resolve_dtype(cfg.model.dtype, device))
    kwargs = {
        "eos_token_ids": list(stop_ids),
        "device": device,
        "dtype": dtype,
        "tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
        "max_model_len": cfg.model.max_len,
        "enforce_eager": cfg.rollout.enforce_eager,
        "enable_sleep_mode": device == "cuda" and cfg.cluster.placement == "colocated",
    }
    if device == "cpu":
        # On CPU the fraction is of host memory and fails at start-up when others hold memory.
        kwargs["kv_cache_memory_bytes"] = cfg.rollout.kv_cache_mb * 2**20
    return kwargs


def role_requests(cfg: Config) -> dict[str, RoleRequest]:
    """What each role asks of the cluster: ``ppo.*_workers`` ranks, ``rollout.num_engines`` engines of
    ``rollout.tensor_parallel_size`` GPUs each, ``reward.function_workers`` CPU actors. Roles a run does
    not use ask for nothing: no critic in critic-free runs, no RM without ``reward.path``."""
    p = cfg.ppo
    requests = {
        "policy": RoleRequest(p.policy_workers),
        "critic": RoleRequest(p.critic_workers),
        "reference": RoleRequest(p.reference_workers),
        "reward": RoleRequest(p.reward_workers),
        "reward_function": RoleRequest(cfg.reward.function_workers, gpus_per_rank=0),
        "rollout": RoleRequest(cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size),
    }
    if p.advantage != "gae":
        del requests["critic"]
    if cfg.reward.path is None:
        del requests["reward"]
    if cfg.reward.function is None:
        del requests["reward_function"]
    return requests


def ppo_bundles(cfg: Config, gpu: bool) -> dict[str, list[dict]]:
    """One resource bundle per actor of every role (:func:`cluster.resources.role_bundles`)."""
    return role_bundles(
        role_requests(cfg),
        gpu=gpu,
        placement=cfg.cluster.placement,
        cpus_per_actor=cfg.cluster.cpus_per_actor,
        extra=cfg.cluster.role_resources,
    )
