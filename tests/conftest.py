"""What every test folder shares: the repository root, the tiny config, the environment of subprocesses.

Test modules import these by module path (``from tests.conftest import REPO``): pytest runs from the
repository root, which is therefore on ``sys.path``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (the working directory of every subprocess a test starts)."""
TINY_CONFIG = REPO / "trainers" / "configs" / "tiny.yaml"
"""The CPU preset every test run starts from."""


_GIVEN_PORTS: set[int] = set()
"""Every port :func:`free_ports` handed out in this session (a service may bind its port seconds later)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on the loopback now, none handed out before in this session, for the
    services of Ray processes a test starts next to the session's own Ray. The sockets stay bound until all
    ``n`` are chosen: the kernel may give a just-closed port again (a node once got the same port for its
    metrics agent and its metrics export, which Ray refuses)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _GIVEN_PORTS:
                _GIVEN_PORTS.add(port)
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def free_port() -> int:
    """One port of :func:`free_ports`."""
    return free_ports(1)[0]


def subprocess_env(*, own_ray: bool = False, no_faults: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment for a ``python -m trainers.cli ...`` subprocess: the repository first on
    ``PYTHONPATH`` (the subprocess then imports this checkout, not another install), plus ``extra``.

    ``own_ray``: without ``RAY_ADDRESS``, so the command starts its own local Ray instead of joining one;
    ``no_faults``: without the ``RLHF_FAULT_*`` variables of a test that set them.
    """
    env = {k: v for k, v in os.environ.items() if not (no_faults and k.startswith("RLHF_FAULT_"))}
    if own_ray:
        env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env | extra


def template_ids(tok, prompt: str, response: str | None = None) -> list[int]:
    """Ids of a one-turn conversation rendered by the tokenizer's own chat template (with the generation
    prompt when there is no response): an independent check of what trainers.data.chat builds."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    return tok.encode(text, add_special_tokens=False)


def world_corpus(seed: int = 0, n: int = 150) -> list[str]:
    """``n`` pretraining documents, ``n`` prompts and their demonstrations from the synthetic world: enough
    text for a small world tokenizer (``train_tokenizer(world_corpus(), DIR, vocab_size=600)``)."""
    import random

    from trainers.data import responses, world_text

    rng = random.Random(seed)
    docs = [world_text.pretrain_document(rng) for _ in range(n)]
    prompts = [world_text.sample_prompt(world_text.sample_task(rng), rng) for _ in range(n)]
    return docs + prompts + [responses.demonstration(p, rng) for p in prompts]
