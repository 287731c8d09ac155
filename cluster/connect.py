"""Connecting to Ray: a local instance for debugging and tests, or an existing cluster.

- ``cluster.ray_address: null`` starts (or joins, inside ``ray job submit``) a Ray instance;
- ``cluster.ray_address: auto`` joins the cluster started with ``ray start --head`` on this machine;
- ``ray://host:10001`` joins a remote cluster through Ray Client.

Ray 2.60 enables token authentication by default; we never turn it off. A client that joins such a
cluster without its token gets one line that says so and how to give the token (:data:`TOKEN_FIX`).
"""

from __future__ import annotations

import logging
import os
import socket
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
    except ray.exceptions.AuthenticationError:
        raise UserError(
            f"cannot connect to Ray at '{address}': token authentication is on (RAY_AUTH_MODE=token) but this "
            f"process has no token; {TOKEN_FIX}"
        ) from None
    except ConnectionError as err:
        cause = str(err)
        if address_answers(address):
            cause = (
                "the address answers but Ray's handshake failed, which is what a cluster with token "
                "authentication (on by default since Ray 2.60) does to a client without its token; "
                f"{TOKEN_FIX}"
            )
        raise UserError(f"cannot connect to Ray at '{address}': {cause}") from None
    return ray


TOKEN_FIX = (
    "set RAY_AUTH_MODE=token and give the cluster's token (the head's ~/.ray/auth_token) as "
    "RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN"
)
"""How a client joins a cluster with token authentication (the head writes its token at start-up)."""


def address_answers(address: str | None, timeout_s: float = 3.0) -> bool:
    """Whether something accepts TCP connections at ``address`` (``host:port`` or ``ray://[user@]host:port``;
    False for ``auto``/None). Ray's ``ConnectionError`` does not say why it failed: a port that answers
    while Ray gives up is a cluster that rejected us (token authentication), not one that is not there."""
    if not address or address == "auto":
        return False
    hostport = address.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False
