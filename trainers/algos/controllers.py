"""KL coefficient controllers (docs/ppo_details.md item 13).

Fixed beta is the default (InstructGPT used 0.02). The adaptive controller is Ziegler et al. 2019
(lm-human-preferences): after each rollout batch,

    e    = clip(KL / target - 1, -0.2, 0.2)
    beta = beta * (1 + e * n_steps / horizon)

where KL is the batch mean of the per-sequence *summed* KL (:func:`trainers.algos.mean_sequence_kl`),
``n_steps`` the number of sequences in that batch and ``horizon`` in the same unit (sequences; the paper
uses 10000). Clipping the error bounds how fast beta moves when the KL is far off target.

Both controllers save and restore their coefficient with ``state_dict``/``load_state_dict``, so a resumed
run continues with exactly the beta it stopped at.
"""

from __future__ import annotations

from typing import Any

from trainers.algos._common import AlgoConfigError

#: Bound on the proportional error of the adaptive controller (Ziegler et al. 2019).
ADAPTIVE_ERROR_CLIP = 0.2

KL_CONTROLLER_KINDS = ("fixed", "adaptive")


def _check_state(state: dict[str, Any], kind: str) -> float:
    if state.get("kind") != kind:
        raise AlgoConfigError(
            f"checkpoint has a {state.get('kind')!r} KL controller but the config asks for {kind!r}"
        )
    return float(state["value"])


class FixedKLController:
    """A constant KL coefficient; ``update`` changes nothing."""

    kind = "fixed"

    def __init__(self, coef: float):
        if coef < 0:
            raise AlgoConfigError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "value"}``."""
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient; a checkpoint of the other kind is a configuration error."""
        self.value = _check_state(state, self.kind)


class AdaptiveKLController:
    """Proportional controller driving the per-sequence KL towards ``target`` (module docstring)."""

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: float):
        if init_coef <= 0 or target <= 0 or horizon <= 0:
            raise AlgoConfigError(
                f"adaptive KL needs init_coef, target and horizon > 0; got {init_coef}, {target}, {horizon}"
            )
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one step of the rule for a batch of ``n_steps`` sequences with mean summed KL
        ``current_kl`` (a float or 0-dim tensor); returns the new coefficient."""
        error = float(current_kl) / self.target - 1.0
        error = min(max(error, -ADAPTIVE_ERROR_CLIP), ADAPTIVE_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "value", "target", "horizon"}``; target and horizon are informative only."""
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient. Target and horizon stay as configured, so a resumed run may change
        them on purpose; a checkpoint of the other kind is a configuration error."""
        self.value = _check_state(state, self.kind)


def make_kl_controller(
    kind: str, coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Build the controller named by ``kind`` ("fixed" or "adaptive"); ``coef`` is the (initial) beta.
    Unknown kinds and missing adaptive settings raise :class:`AlgoConfigError` (a ``ValueError``)."""
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise AlgoConfigError("adaptive KL controller needs both a target and a horizon")
        return AdaptiveKLController(coef, target, horizon)
    raise AlgoConfigError(f"unknown KL controller {kind!r}; expected one of {', '.join(KL_CONTROLLER_KINDS)}")
