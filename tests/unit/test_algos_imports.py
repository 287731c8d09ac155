"""trainers.algos must import with only torch and the standard library (docs/design.md, "Layout")."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# An import hook that refuses the heavy frameworks; importing trainers.algos under it must succeed,
# and a direct import of one of them must fail (proving the hook is active).
SCRIPT = """
import sys
FORBIDDEN = {"ray", "deepspeed", "vllm", "transformers"}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("forbidden import: " + name)
        return None

sys.meta_path.insert(0, Refuse())
import trainers.algos
assert not FORBIDDEN & {m.split(".")[0] for m in sys.modules}, sorted(sys.modules)
try:
    import ray
except ImportError:
    print("OK")
"""


def test_algos_imports_without_heavy_frameworks():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
