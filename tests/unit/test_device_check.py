"""tests/gpu/device_check.sh on a CPU machine: it parses, refuses unknown arguments, and stops with one clear
line (exit 2, nothing run) where no GPU is visible. Its GPU run is what tests/gpu/README.md describes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "gpu" / "device_check.sh"


def test_the_script_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_without_cuda_it_stops_before_any_step_with_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device visible" in proc.stdout + proc.stderr
    found = json.loads((tmp_path / "environment.json").read_text())
    assert found["missing"] == [] and found["found"]["cuda_available"] is False
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["environment.log"]  # no step ran
