"""Colocated GPU placement: the vLLM engines lend their GPU memory to the training roles and take it back.

With ``cluster.placement=colocated`` on GPUs, rank r of every role and engine r share GPU r
(``cluster/resources.py``). The engines need their weights and KV cache only to generate, so one
iteration moves their memory like this (:func:`trainers.ppo.driver.run_iteration`)::

    generate       awake      weights + KV cache on the GPU
    sleep                     vLLM level 1: weights copied to host memory, KV cache dropped
    experience     asleep     the policy, reference, reward and critic passes have the GPU
    train          asleep
    wake weights   weights    only the weights come back, so the sync's buckets fit beside them
    sync           weights    the new policy weights go into those tensors
    wake kv_cache  awake      the KV cache comes back last: evaluation and the next generate

Everywhere else (dedicated placement, or any placement on CPU, where vLLM has no sleep mode) the
engines stay awake and every step below is a no-op. :class:`EngineMemory` holds which of the three
states the engines are in and makes each move once: a move to where the engines already are (the
start-up sync of a resumed run wakes awake engines) sends nothing; generating while they are not awake,
or bringing the KV cache back before the weights, is an internal error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray

AWAKE, ASLEEP, WEIGHTS_ONLY = "awake", "asleep", "weights"
"""The engines' memory states: everything on the GPU; nothing; the weights without the KV cache."""


class EngineMemory:
    """The colocated engines' GPU memory over one iteration (module docstring); a no-op unless ``colocated``.

    ``engines``: returns the rollout engines' actor handles (:meth:`trainers.ppo.roles.Roles.engines`),
    read at each move so a restarted engine is included. ``get``: resolves the calls' refs (``ray.get``;
    a unit test passes its own). Engines start awake (vLLM starts with its memory allocated).
    """

    def __init__(
        self,
        engines: Callable[[], Sequence[Any]],
        colocated: bool,
        get: Callable[[list], Any] = ray.get,
    ):
        self.engines, self.colocated, self.get = engines, colocated, get
        self.state = AWAKE

    def sleep(self) -> None:
        """Free the engines' GPU memory for experience and training (from awake only)."""
        if self.colocated and self.state == AWAKE:
            self.get([e.sleep.remote() for e in self.engines()])
            self.state = ASLEEP

    def wake_weights(self) -> None:
        """Bring back the weights alone, before the weight sync writes into them (from asleep only)."""
        if self.colocated and self.state == ASLEEP:
            self.get([e.wake_up.remote(["weights"]) for e in self.engines()])
            self.state = WEIGHTS_ONLY

    def wake_kv_cache(self) -> None:
        """Bring back the KV cache after the sync, so the engines can generate again (from weights only)."""
        if not self.colocated or self.state == AWAKE:
            return
        if self.state == ASLEEP:
            raise RuntimeError(
                "the engines' KV cache woken before their weights (the weight sync was skipped)"
            )
        self.get([e.wake_up.remote(["kv_cache"]) for e in self.engines()])
        self.state = AWAKE

    def require_awake(self, phase: str) -> None:
        """RuntimeError unless the engines can generate now (``phase`` names the caller)."""
        if self.colocated and self.state != AWAKE:
            raise RuntimeError(f"{phase} needs the rollout engines awake, but they are {self.state}")
