"""What every test folder shares: the repository root, the tiny config, the environment of subprocesses.

Test modules import these by module path (``from tests.conftest import REPO``): pytest runs from the
repository root, which is therefore on ``sys.path``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (the working directory of every subprocess a test starts)."""
TINY_CONFIG = REPO / "trainers" / "configs" / "tiny.yaml"
"""The CPU preset every test run starts from."""


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a ``python -m trainers.cli ...`` subprocess: the repository first on
    ``PYTHONPATH`` (the subprocess then imports this checkout, not another install), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
