"""Before any actor starts: what the user can get wrong (validation), the run's tokenized inputs, and what
each role is given -- its spec, the rollout engines' arguments, its resource request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from actors.specs import ModelSpec, TrainSpec
from cluster.resources import RoleRequest, role_bundles
from trainers.config import Config, tokenizer_dir
from trainers.data import read_records
from trainers.data.collate import encode_prompt, text_windows
from trainers.data.io import data_path
from trainers.data.tokenizer import load_tokenizer
from trainers.data.validate import MAX_PROBLEMS, raise_if_problems
from trainers.errors import ConfigError, DataError
from trainers.runs.outdir import check_output_dir
from trainers.runtime.device import resolve_dtype, vllm_dtype
from trainers.runtime.models import check_model_dir, eos_ids_of
from trainers.runtime.zero import grad_accum_steps


@dataclass
class RunData:
    """Tokenized inputs of a run, built once on the driver during validation."""

    prompts: list[list[int]]
    """Every training prompt, chat-formatted and encoded (BOS + prompt), unpadded."""
    ptx: list[list[int]]
    """Pretraining text windows of at most ``model.max_len`` tokens (empty when ptx is off)."""
    pad_id: int
    """Fills padding only (masks come from lengths), so it may equal a stop id (docs/ppo_details.md item 2)."""
    stop_ids: tuple[int, ...]
    """The run's one stop set (:func:`stop_ids_for`): vLLM stops on it, the driver cuts at its first id,
    ``rollout/eos_rate`` counts it (docs/ppo_details.md item 28)."""


def stop_ids_for(tokenizer, model_dir: str | os.PathLike) -> tuple[int, ...]:
    """The stop ids of a run, sorted: the tokenizer's ``eos_token_id`` and every ``eos_token_id`` of the
    policy directory's ``generation_config.json`` / ``config.json``
    (:func:`trainers.runtime.models.eos_ids_of`; vLLM stops on those by itself, so the set must hold them).

    A set that is empty, or holds an id outside the tokenizer's vocabulary, is a :class:`ConfigError`.
    """
    ids = set(eos_ids_of(model_dir))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ConfigError(
            f"model.path='{model_dir}': no stop token: neither the tokenizer nor generation_config.json / "
            "config.json names an eos_token_id"
        )
    outside = sorted(i for i in ids if not 0 <= i < len(tokenizer))
    if outside:
        raise ConfigError(
            f"model.path='{model_dir}': eos_token_id {outside[0]} is outside the tokenizer's vocabulary "
            f"(size {len(tokenizer)})"
        )
    return tuple(sorted(ids))


def encode_train_prompts(cfg: Config, tokenizer) -> list[list[int]]:
    """Validated ``prompts/train`` encoded with the chat format; a DataError lists the prompts that leave
    no room for ``rollout.max_new_tokens`` within ``model.max_len``."""
    path = data_path(cfg.data.dir, "prompts", "train")
    encoded = [encode_prompt(tokenizer, r["prompt"]) for r in read_records("prompts", [path])]
    room = cfg.model.max_len - cfg.rollout.max_new_tokens
    lines = [
        f"{path}:{row + 1}: prompt is {len(ids)} tokens long; with rollout.max_new_tokens="
        f"{cfg.rollout.max_new_tokens} it exceeds model.max_len={cfg.model.max_len}"
        for row, ids in enumerate(encoded)
        if len(ids) > room
    ][:MAX_PROBLEMS]
    raise_if_problems(lines)
    if not encoded:
        raise DataError(f"{path}: no prompts")
    return encoded


def validate_run(cfg: Config, out_dir: str | os.PathLike) -> tuple[Path, RunData]:
    """Everything the user can get wrong, except resources, checked before anything starts or is
    written: output directory, both model directories (config.json + safetensors), tokenizer (the same in
    the RM directory), the stop ids (:func:`stop_ids_for`), prompts and -- with ``ppo.ptx_coef > 0`` -- the
    pretraining text."""
    out = check_output_dir(out_dir)
    model_dir = check_model_dir(cfg.model.path, "model.path")
    rm_dir = check_model_dir(cfg.reward.path, "reward.path")
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    rm_tokenizer = load_tokenizer(rm_dir) if (rm_dir / "tokenizer.json").is_file() else None
    if rm_tokenizer is not None and rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"reward.path='{rm_dir}' has another tokenizer than the policy ({tokenizer_dir(cfg)}); the reward "
            "model must read the policy's token ids (docs/ppo_details.md item 7)"
        )
    stop_ids = stop_ids_for(tokenizer, model_dir)
    prompts = encode_train_prompts(cfg, tokenizer)
    ptx: list[list[int]] = []
    if cfg.ppo.ptx_coef > 0:
        records = read_records("pretrain", [data_path(cfg.data.dir, "pretrain", "train")])
        ptx = text_windows(tokenizer, [r["text"] for r in records], cfg.model.max_len)
        if not ptx:
            raise DataError("ppo.ptx_coef > 0 but pretrain/train holds no text")
    return out, RunData(prompts, ptx, tokenizer.pad_token_id, stop_ids)


def role_specs(cfg: Config, device: str) -> dict:
    """Each DeepSpeed role's :class:`actors.specs.ModelSpec`: only what that actor needs (STYLE).

    Policy and reference start from ``model.path`` (SFT), reward and critic from ``reward.path`` (RM).
    """
    p = cfg.ppo
    common = {
        "device": device,
        "dtype": resolve_dtype(cfg.model.dtype, device),
        "zero_stage": p.zero_stage,
        "micro_batch_size": p.micro_batch_size,
        "temperature": cfg.rollout.temperature,
        "torch_threads": cfg.cluster.torch_threads,
        "seed": p.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    sft, rm = str(Path(cfg.model.path).resolve()), str(Path(cfg.reward.path).resolve())
    train = {"weight_decay": p.weight_decay, "grad_clip": p.grad_clip}
    return {
        "policy": TrainSpec(
            model_path=sft,
            lr=p.policy_lr,
            grad_accum=grad_accum_steps(p.mini_batch_size, p.micro_batch_size, p.policy_workers),
            clip_eps=p.clip_eps,
            ptx_coef=p.ptx_coef,
            tokenizer_path=str(tokenizer_dir_of(cfg)),
            **train,
            **common,
        ),
        "critic": TrainSpec(
            model_path=rm,
            lr=p.critic_lr,
            grad_accum=grad_accum_steps(p.mini_batch_size, p.micro_batch_size, p.critic_workers),
            clip_eps=p.value_clip_eps,
            **train,
            **common,
        ),
        "reference": ModelSpec(model_path=sft, **common),
        "reward": ModelSpec(model_path=rm, **common),
    }


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
    ``rollout.tensor_parallel_size`` GPUs each."""
    p = cfg.ppo
    return {
        "policy": RoleRequest(p.policy_workers),
        "critic": RoleRequest(p.critic_workers),
        "reference": RoleRequest(p.reference_workers),
        "reward": RoleRequest(p.reward_workers),
        "rollout": RoleRequest(cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size),
    }


def ppo_bundles(cfg: Config, gpu: bool) -> dict[str, list[dict]]:
    """One resource bundle per actor of every role (:func:`cluster.resources.role_bundles`)."""
    return role_bundles(
        role_requests(cfg),
        gpu=gpu,
        placement=cfg.cluster.placement,
        cpus_per_actor=cfg.cluster.cpus_per_actor,
    )
