"""tests/bench/iteration.py's pure part: the ratios of issue 17 from per-iteration rows."""

from __future__ import annotations

import pytest

from tests.bench._iteration_reference import medians
from tests.bench.iteration import summarize
from tests.conftest import TINY_CONFIG


def test_ratios_are_ours_against_the_reference_phase_by_phase():
    from trainers.config import load_config

    cfg = load_config(TINY_CONFIG, [])
    ours = [
        {"generate": 1.0, "experience": 1.0, "train": 4.0, "sync": 0.5, "other": 0.5, "iteration": 7.0,
         "gen_tokens": 100, "train_tokens": 400, "sync_bytes": 1000.0},
    ] * 3  # fmt: skip
    ref = [
        {"generate": 0.5, "experience": 0.5, "train": 2.0, "copy": 0.001, "iteration": 3.5, "gen_tokens": 100,
         "sync_bytes": 1000, "train_layout_bound": 1.0},
    ] * 3  # fmt: skip
    r = summarize("tiny", cfg, ours, ref, 2, medians, 1.0)["ratios"]
    assert r["gen_tokens_per_s_vs_raw_vllm"] == pytest.approx(0.5)  # ours half as fast
    assert r["train_tokens_per_s_vs_plain_torch"] == pytest.approx(0.5)
    assert r["sync_bytes_per_s_vs_plain_copy"] == pytest.approx(0.001 / 0.5)
    assert r["driver_overhead_fraction"] == pytest.approx(0.5 / 7.0)
    assert r["iteration_vs_one_process_reference"] == pytest.approx(2.0)
    assert r["train_vs_layout_bound"] == pytest.approx(4.0)
