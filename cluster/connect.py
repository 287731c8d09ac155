"""Connecting to Ray: a local instance for debugging and tests, or an existing cluster.

- ``cluster.ray_address: null`` starts (or joins, inside ``ray job submit``) a Ray instance;
- ``cluster.ray_address: auto`` joins the cluster started with ``ray start --head`` on this machine;
- ``ray://host:10001`` joins a remote cluster through Ray Client.

Ray 2.60 enables token authentication by default; we never turn it off.
"""

from __future__ import annotations

import logging
import os
import warnings

from trainers.errors import UserError


def runtime_env_vars(torch_threads: int = 1) -> dict[str, str]:
    """Environment every worker gets: one torch thread per actor on small CPU machines, quiet logs."""
    return {
        "OMP_NUM_THREADS": str(torch_threads),
        "MKL_NUM_THREADS": str(torch_threads),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "1",
    }


def connect(address: str | None = None, num_cpus: int | None = None, torch_threads: int = 1):
    """Initialise Ray once per process; returns the ray module.

    Inside ``ray job submit`` the job already names its cluster (RAY_ADDRESS), so ``address=None``
    joins it instead of starting a new one.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {
        "runtime_env": {"env_vars": runtime_env_vars(torch_threads)},
        "log_to_driver": True,
        "include_dashboard": False if address is None else None,
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        with warnings.catch_warnings():
            # Ray Client warns before it raises on a timeout, and logs the init arguments it forwards
            # (ray.init always forwards log_to_driver); the error line below says what went wrong once.
            warnings.filterwarnings("ignore", message="Ray Client connection timed out")
            client_log = logging.getLogger("ray.client_builder")
            level = client_log.level
            client_log.setLevel(logging.WARNING)
            try:
                ray.init(address=address, **kwargs)
            finally:
                client_log.setLevel(level)
    except ConnectionError as err:
        raise UserError(f"cannot connect to Ray at '{address}': {err}") from None
    return ray
