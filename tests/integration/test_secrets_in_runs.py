"""Real stage runs write no secret: Ray's auth token (token authentication is on by default in Ray
2.60) and every secret-named environment variable's value (``trainers.redact.known_secrets``) are
absent from every file the session's pretrain, SFT and RM runs wrote -- config snapshot,
metrics.jsonl, TensorBoard events, summary.json, Ray Train checkpoints, the saved model.

The runs are the session fixtures, so this costs only the reading. tests/unit/test_secrets.py checks
the same with marker secrets on commands that need no Ray.
"""

from __future__ import annotations

import pytest

from trainers.redact import known_secrets

pytestmark = pytest.mark.integration


def test_stage_outputs_hold_no_secret(ray_local, base_run, sft_run, rm_run):
    secrets = [s.encode() for s in known_secrets()]
    assert secrets, "Ray runs with token authentication, so its token should be visible here"
    files = [f for run in (base_run, sft_run, rm_run) for f in run.out.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    for f in files:
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f"a secret is written in {f}"
