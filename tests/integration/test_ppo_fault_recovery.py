"""PPO survives what goes wrong (issue 8): a vLLM engine lost mid-run, a training rank lost mid-run.

Real Ray, DeepSpeed ZeRO-3 (2 policy ranks over gloo), one vLLM engine, the session's tiny SFT model and
RM. The session's uninterrupted run (``ppo_reference``, conftest.py; 6 iterations, of which these 4-iteration
runs compare the first 4) is the yardstick: every random choice derives from (seed, iteration), so a run
that lost an engine, or that stopped and resumed, must log the same metrics for every iteration. Tolerance: rel 1e-6 (abs 1e-9) for every non-timing metric -- the in-process resume test's
tolerance; it has been bit-identical here.

Faults: the engine crashes through ``RLHF_FAULT_KILL_ENGINE`` (``cluster/faults.py``: the actor itself
``os._exit(1)``s at a named point, once per marker file), which hits an exact phase of an exact iteration;
the policy rank is killed with ``ray.kill`` from a thread as soon as the first checkpoint exists.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import load_ppo_config, ppo_inputs, reference_variant

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ITERATIONS = 4
RUN_OVERRIDES = reference_variant(
    [f"ppo.iterations={ITERATIONS}", "ppo.checkpoint_every=1", "ppo.max_engine_restarts=2"]
)
"""The reference run's settings with 4 iterations, a checkpoint after each and 2 engine restarts allowed."""
REL, ABS = 1e-6, 1e-9
"""Metrics of a disturbed run against the uninterrupted one (non-timing keys)."""


def assert_same_metrics(records: list[dict], reference: list[dict]) -> None:
    """Row by row, every non-timing metric equal within REL/ABS (engine restarts are compared apart)."""
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for row, ref in zip(records, reference):
        for key in (k for k in ref if not k.startswith("timing/") and k != "rollout/engine_restarts"):
            assert row[key] == pytest.approx(ref[key], rel=REL, abs=ABS), (row["step"], key)


@pytest.fixture(scope="module")
def cfg(world_dir, sft_model_dir, rm_model_dir):
    return load_ppo_config(ppo_inputs(world_dir, sft_model_dir, rm_model_dir), RUN_OVERRIDES)


@pytest.fixture(scope="module")
def reference(ppo_reference) -> list[dict]:
    """Metrics of the uninterrupted run's first ITERATIONS iterations."""
    records = ppo_reference.records[:ITERATIONS]
    assert [r["rollout/engine_restarts"] for r in records] == [0.0] * ITERATIONS
    return records


def test_lost_engine_is_restarted_resynced_and_the_phase_retried(
    ray_local, cfg, reference, tmp_path, monkeypatch, capsys
):
    """Engine 0 crashes at the start of iteration 2's generate, and again while receiving the weights of
    iteration 3's sync. Both times Ray restarts it (SFT weights from disk), the driver pushes the current
    policy weights and redoes the phase: all iterations run, each lost engine is counted, vLLM's log-probs
    match the policy's as closely as ever, and every metric equals the uninterrupted run's. This run sends
    the weights by the gloo broadcast (the reference run by the CPU default, the blob transport: the same
    bytes arrive), whose group is formed anew after each loss."""
    from trainers.ppo.driver import run_ppo
    from trainers.ppo.schedule import derived_seed
    from trainers.runs.metrics import read_metrics

    generate_marker, sync_marker = tmp_path / "killed-in-generate", tmp_path / "killed-in-sync"
    # Weight updates are counted per engine process: the restarted engine gets #1 (the re-push after
    # the crash in iteration 2), #2 (iteration 2's sync), #3 (iteration 3's sync).
    spec = f"generate:{derived_seed(cfg.ppo.seed, 1, 0)}@{generate_marker};weights:3@{sync_marker}"
    monkeypatch.setenv("RLHF_FAULT_KILL_ENGINE", spec)
    out = tmp_path / "run"
    cfg = copy.deepcopy(cfg)
    cfg.rollout.weight_sync = "broadcast"
    summary = run_ppo(cfg, out)
    printed = capsys.readouterr().out

    assert generate_marker.exists() and sync_marker.exists()  # both faults fired
    assert summary["ppo/iterations"] == ITERATIONS
    records = read_metrics(out / "metrics.jsonl")
    assert [r["rollout/engine_restarts"] for r in records] == [0.0, 1.0, 1.0, 0.0]
    lines = [line for line in printed.splitlines() if "rollout engine 0 lost" in line]
    assert len(lines) == 2 and "generate of iteration 2" in lines[0] and "weight sync" in lines[1], printed
    # The gloo broadcast's group is formed at the first push, and formed anew with the restarted engine
    # after each loss (the push after recovery), never otherwise.
    setups = [line for line in printed.splitlines() if "weight sync formed its broadcast group" in line]
    assert [line.split("(setup ")[1].split(",")[0] for line in setups] == ["1", "2", "3"], printed
    for record in records:  # the restarted engine samples with the current policy, not with SFT's weights
        assert record["rollout/vllm_logprob_diff_max"] < 1e-3, record["step"]
    for step in (2, 4):  # the first samples after each restart
        row = records[step - 1]
        assert row["rollout/ref_logprob_diff"] > 20 * row["rollout/vllm_logprob_diff"], step
    assert_same_metrics(records, reference)


def kill_when_checkpointed(out: Path, suffix: str, timeout_s: float = 900) -> dict:
    """Start a thread that, once ``out/checkpoints/iter_000001`` exists, kills the named actor ending in
    ``suffix`` (for good: ``ray.kill`` without restart); returns a dict the thread fills in."""
    import ray

    seen: dict = {}

    def watch() -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline and not (out / "checkpoints" / "iter_000001").is_dir():
            time.sleep(0.05)
        names = [n for n in ray.util.list_named_actors() if n.endswith(suffix)]
        if names:
            ray.kill(ray.get_actor(names[0]))
            seen["name"] = names[0]

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    seen["thread"] = thread
    return seen


def test_lost_training_rank_stops_with_one_line_and_the_rerun_resumes(ray_local, cfg, reference, tmp_path):
    """Policy rank 1 killed after the first checkpoint: RunStopped naming the role, rank and the newest
    complete checkpoint, no actor of the run left; the same call again resumes from that checkpoint and
    the whole run's metrics equal the uninterrupted run's."""
    from trainers.errors import RunStopped
    from trainers.ppo.checkpoint import complete_checkpoints
    from trainers.ppo.driver import run_ppo
    from trainers.runs.metrics import read_metrics

    out = tmp_path / "run"
    seen = kill_when_checkpointed(out, "-policy-1")
    with pytest.raises(RunStopped) as stopped:
        run_ppo(cfg, out)
    seen["thread"].join(5)
    assert "name" in seen, "the policy rank was never killed"
    message = str(stopped.value)
    newest = complete_checkpoints(out / "checkpoints")[-1]
    assert "\n" not in message and message.startswith("policy rank 1 died"), message
    assert f"resume from {newest}" in message, message
    run = seen["name"].rsplit("-policy-1", 1)[0]
    assert not [n for n in ray_local.util.list_named_actors() if n.startswith(run + "-")]  # all stopped
    groups = ray_local.util.placement_group_table().values()
    assert all(g["state"] == "REMOVED" for g in groups if g["name"].startswith(run + "-"))

    summary = run_ppo(cfg, out)
    assert summary["ppo/resumed_from_iteration"] == int(newest.name.removeprefix("iter_"))
    assert summary["ppo/iterations"] == ITERATIONS
    assert_same_metrics(read_metrics(out / "metrics.jsonl"), reference)
