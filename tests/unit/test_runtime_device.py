"""trainers.runtime.device: the one place that resolves devices and dtypes."""

from __future__ import annotations

import torch

from trainers.runtime.device import resolve_device, resolve_dtype, torch_dtype, vllm_dtype


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("auto", "cuda") == "bf16"
    assert resolve_dtype("fp32", "cuda") == "fp32"
    assert resolve_dtype("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_dtype_names_for_torch_and_vllm():
    assert torch_dtype("fp32") is torch.float32 and torch_dtype("bf16") is torch.bfloat16
    assert vllm_dtype("fp32") == "float32" and vllm_dtype("bf16") == "bfloat16"
