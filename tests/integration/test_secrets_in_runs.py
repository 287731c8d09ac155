"""Real stage runs write no secret: Ray's auth token (token authentication is on by default in Ray
2.60) and the values of secret-named environment variables are absent from every file the session's
pretrain, SFT and RM runs wrote -- config snapshot, metrics.jsonl, TensorBoard events, summary.json,
Ray Train checkpoints, the saved model.

The secrets looked for are this test's own, not what the code under test counts as secret: marker
values planted in secret-named environment variables when pytest imports this module (collection
comes before any fixture, so the session's Ray and every worker of the runs inherit them), and Ray's
token read from where Ray keeps it. With RLHF_TEST_STAGE_CACHE, reused runs saw the environment of
the session that trained them.

The runs are the session fixtures, so this costs only the reading. tests/unit/test_secrets.py checks
the same with marker secrets on commands that need no Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MARKERS = {
    "RLHF_TEST_RUN_API_KEY": "marker-run-api-key-41c7d2",
    "RLHF_TEST_RUN_AUTH_TOKEN": "marker-run-auth-token-9e03fa",
}
"""Secret-named variables (an ``*_API_KEY`` and an ``*_AUTH_TOKEN``) with values found nowhere else."""
os.environ.update(MARKERS)


def ray_token() -> str:
    """Ray's auth token: ``RAY_AUTH_TOKEN`` if set, else its token file (``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``, written when the session's Ray started)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip()


def test_stage_outputs_hold_no_secret(ray_local, base_run, sft_run, rm_run):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker_environment() -> dict:
        return {name: os.environ.get(name) for name in MARKERS}

    assert ray.get(worker_environment.remote()) == MARKERS  # the runs' workers see the markers
    token = ray_token()
    assert len(token) >= 16, "Ray runs with token authentication, so its token should be readable here"
    secrets = [token.encode(), *(value.encode() for value in MARKERS.values())]
    files = [f for run in (base_run, sft_run, rm_run) for f in run.out.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    for f in files:
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f"a secret is written in {f}"
