"""The lines a run prints while it works: compact numbers, one line per logged step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_number(value: Any) -> str:
    """Compact human form for progress lines: 4 significant digits, integers as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def progress_line(stage: str, step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``"sft step 12/300 loss 2.31 tokens/s 9,812 lr 9.8e-05"``: the line printed while a stage runs."""
    parts = [f"{stage} step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {format_number(metrics['loss'])}")
    if "tokens_per_s" in metrics:
        parts.append(f"tokens/s {float(metrics['tokens_per_s']):,.0f}")
    for key in ("accuracy", "valid_loss", "valid_accuracy", "lr", "grad_norm"):
        if key in metrics:
            parts.append(f"{key} {format_number(metrics[key])}")
    return " ".join(parts)
