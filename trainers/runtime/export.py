"""Weights out of a (possibly ZeRO-3-partitioned) model: gathered tensors and Hugging Face directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainers.files import replace_dir
from trainers.runtime.dist import barrier, rank
from trainers.runtime.zero import gathered, unwrap


def gathered_state_dict(model_or_engine, to_rank: int | None = 0) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) parameters and persistent buffers, as CPU tensors.

    Collective under ZeRO-3: every rank must call it. Parameters are gathered one at a time
    (``deepspeed.zero.GatheredParameters``) so peak memory is one full parameter. Only ``to_rank``
    gets the tensors (None: every rank); other ranks get an empty dict.
    """
    module = unwrap(model_or_engine)
    keep = to_rank is None or rank() == to_rank
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with gathered([param]):
            if keep:
                out[name] = param.detach().to("cpu", copy=True)
    if keep:
        persistent = set(module.state_dict().keys())
        for name, buf in module.named_buffers():
            if name in persistent:
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def save_hf(
    model_or_engine,
    tokenizer,
    out_dir: str | Path,
    config_updates: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Save a (possibly ZeRO-3-partitioned) model as a plain Hugging Face directory, atomically.

    Collective: every rank calls it; rank 0 writes ``out_dir`` (safetensors ``save_pretrained`` +
    tokenizer + ``config_updates`` merged into config.json) into ``out_dir.tmp`` and renames it
    into place. ``dtype`` casts floating tensors before writing (default: as trained). Returns the
    path on rank 0, None elsewhere.
    """
    module = unwrap(model_or_engine)
    state = gathered_state_dict(module, to_rank=0)
    out_dir = Path(out_dir)
    for key, value in (config_updates or {}).items():
        setattr(module.config, key, value)  # on every rank: the live model must agree with the saved one
    result = None
    if rank() == 0:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        module.save_pretrained(str(tmp), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, out_dir)
        result = out_dir
    barrier()
    return result
