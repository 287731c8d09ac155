"""Small internal helpers shared by the algos modules (masks, dtypes, the token normaliser)."""

from __future__ import annotations

import torch

from trainers.errors import ConfigError


class AlgoConfigError(ConfigError, ValueError):
    """A bad algorithm setting (unknown KL estimator, non-positive horizon, ...).

    It is a :class:`ConfigError` so the CLI prints one line and exits with code 2, and a ``ValueError`` so
    code that treats it as a plain bad-argument error keeps working.
    """


def bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor after checking that it has the shape of ``like``.

    Masks are binary: any non-zero entry counts as a real token (float, bool and integer masks are all
    accepted). Fractional weights are not supported on purpose: every loss here is a token mean.
    """
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in at least float32: ratios and exponentials in bf16/fp16 lose too much precision."""
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        return x.float()
    return x


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace padding entries by 0 so that inf/nan garbage there cannot reach a loss or its gradient.

    ``x * mask`` is not enough: ``inf * 0`` is nan, and nan in the forward pass of exp() turns a zero
    upstream gradient into a nan gradient. ``torch.where`` selects instead of multiplying.
    """
    return torch.where(bool_mask(mask, x), x, torch.zeros((), dtype=x.dtype, device=x.device))
