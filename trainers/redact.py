"""Secrets: what must never reach a printed line, a config snapshot or a metrics file.

Every config that is printed or written, every W&B run config and every error line the CLI prints goes
through :func:`redact` or :func:`redact_text`. Stdlib only: a leaf that config, logging and the CLI share.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
"""What a secret is replaced with."""
SECRET_KEY = re.compile(
    r"secret|passw|api_?key|access_?key|private_?key|credential|(^|[_.-])(auth_?)?token$", re.IGNORECASE
)
"""Key or variable names that hold a secret (``WANDB_API_KEY``, ``RAY_AUTH_TOKEN``, ``hf_token``...);
``max_new_tokens``, ``tokenizer`` or ``RAY_AUTH_TOKEN_PATH`` do not match."""
URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^/\s@]+)(@)", re.IGNORECASE)
"""The password of ``scheme://user:password@host`` (e.g. a ``cluster.ray_address``)."""
MIN_SECRET_CHARS = 8
"""Shorter values of secret variables (``1``, ``true``) are not searched for in text."""


def is_secret_key(key: str) -> bool:
    """Whether a config key or environment variable name looks like it holds a secret (:data:`SECRET_KEY`)."""
    return bool(SECRET_KEY.search(key))


def known_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Secret values this process can see, longest first: environment variables with a secret-looking
    name (Ray's ``RAY_AUTH_TOKEN``, ``WANDB_API_KEY``...) and Ray's token file (``RAY_AUTH_TOKEN_PATH``,
    else ``~/.ray/auth_token``)."""
    environ = os.environ if environ is None else environ
    values = [v.strip() for k, v in environ.items() if is_secret_key(k)]
    token_file = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):  # no token file, or unreadable: nothing to hide from it
        values.append(token_file.read_text().strip())
    return sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with URL passwords and every known secret value (:func:`known_secrets`) replaced."""
    text = URL_CREDENTIALS.sub(rf"\1{REDACTED}\3", text)
    for secret in known_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(mapping: Mapping, secrets: list[str] | None = None) -> dict:
    """A copy of ``mapping`` (nested mappings and lists too) safe to write or print: the value of every
    secret-looking key becomes :data:`REDACTED`, and strings go through :func:`redact_text`."""
    secrets = known_secrets() if secrets is None else secrets

    def clean(key: str | None, value: Any) -> Any:
        if key is not None and is_secret_key(key) and value not in (None, ""):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(None, v) for v in value]
        return redact_text(value, secrets) if isinstance(value, str) else value

    return clean(None, mapping)
