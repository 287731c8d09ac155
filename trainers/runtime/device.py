"""Which device and dtype a run uses: the one place that resolves ``cluster.device`` and ``model.dtype``.

``auto`` means CUDA when a GPU is visible, else the CPU; the dtype ``auto`` is fp32 on CPU (gloo has no
bf16 fast path; the CPU path is the tested one) and bf16 on GPU (DeepSpeed keeps fp32 master weights).
Stages, PPO actors, vLLM engines and evaluation all read it from here.
"""

from __future__ import annotations

import torch

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""Our dtype names -> vLLM's ``dtype`` argument."""


def resolve_device(device: str = "auto") -> str:
    """``'cuda'`` or ``'cpu'``: ``auto`` picks CUDA when present."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``'fp32'`` or ``'bf16'``: ``auto`` is fp32 on CPU (gloo has no bf16 fast path) and bf16 on GPU."""
    if dtype == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return dtype


def torch_dtype(dtype: str) -> torch.dtype:
    """``'fp32'`` / ``'bf16'`` -> the torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def vllm_dtype(dtype: str) -> str:
    """``'fp32'``/``'bf16'`` -> the name vLLM's ``LLM(dtype=...)`` takes."""
    return VLLM_DTYPES[dtype]


def disable_cudnn_attention() -> None:
    """Keep PyTorch's SDPA off the cuDNN backend (call once per GPU process, before training).

    Seen on an H100 (torch 2.11, bf16, tiny Llama): with left padding, the default SDPA dispatch
    picked cuDNN attention for some shapes (sequence length 64) and its backward returned non-finite
    gradients for the fully-masked padding rows; DeepSpeed then skipped those steps ("OVERFLOW!").
    The memory-efficient and math backends gave finite gradients at every length tried. A no-op
    without CUDA.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
