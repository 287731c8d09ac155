"""Issue 15 end to end on CPU (real Ray, DeepSpeed ZeRO-3 over gloo, vLLM): critic-free estimators, the
reward sources other than the RM, DAPO's dynamic sampling and evaluation while training.

- ``critic_free``: GRPO with 4 samples per prompt and no RM at all: the world's gold labeler as a reward
  function and as an HTTP endpoint the test serves on loopback, both scoring some tasks 0 whatever the
  response (so dynamic sampling has groups without signal to drop); no critic and no reward-model actor
  start. Run 4 iterations, and again as 2 + a resumed 2: the same metrics.
- a run combining the RM and the gold function with weights: the logged score is their weighted sum.
- a reward function that raises: ``rlhf: stopped:`` naming the source and the row, exit 3; the same
  command resumes from the checkpoint and finishes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONFIG, subprocess_env
from tests.integration.conftest import load_ppo_config, ppo_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

CONSTANT_TASKS = ("story", "describe")
"""Tasks the test's reward function scores 0 whatever the response: their groups carry no signal."""
FUNCTION_FILE = """
from trainers.data import gold

def reward(prompts, responses, rows):
    scores = gold.reward(prompts, responses, rows)
    return [0.0 if row.get("task") in {tasks!r} else s for s, row in zip(scores, rows)]
"""
"""The function reward of the critic-free runs (``{tasks}``: :data:`CONSTANT_TASKS`); the endpoint scores alike."""


def gold_except_constant(prompts, responses, rows) -> list[float]:
    """The gold labeler's scores, 0 on :data:`CONSTANT_TASKS` (what the function file computes)."""
    from trainers.data import gold

    scores = gold.reward(prompts, responses, rows)
    return [0.0 if row.get("task") in CONSTANT_TASKS else s for s, row in zip(scores, rows)]


GROUP_OVERRIDES = [
    "ppo.advantage=grpo",
    "ppo.samples_per_prompt=4",
    "ppo.prompts_per_iteration=8",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=4",
    "ppo.policy_workers=2",
    "ppo.policy_lr=2e-4",
    "ppo.kl_coef=0",
    "ppo.kl_loss_coef=0.05",
    "ppo.clip_eps_high=0.28",
    "ppo.loss_agg=seq_mean_token_mean",
    "ppo.ptx_coef=0",
    "rollout.max_new_tokens=32",
    "reward.overlong_buffer=8",
    "logging.log_every=1",
]
"""The shared settings of the critic-free runs: 32 rows per iteration, 2 optimizer steps x 1 epoch x 2."""


class GoldHandler(BaseHTTPRequestHandler):
    """A reward endpoint: POST {prompts, responses, rows} -> {scores} (:func:`gold_except_constant`)."""

    calls: list[int] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        scores = gold_except_constant(body["prompts"], body["responses"], body["rows"])
        type(self).calls.append(len(scores))
        data = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def gold_server():
    """The loopback reward endpoint (own port), shut down after the module."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), GoldHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score", GoldHandler.calls
    server.shutdown()


@pytest.fixture(scope="module")
def function_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward_fn") / "constant_some.py"
    path.write_text(FUNCTION_FILE.format(tasks=set(CONSTANT_TASKS)))
    return path


def critic_free_config(world_dir, sft_model_dir, function_file, url, extra=()):
    inputs = [f"data.dir={world_dir}", f"model.path={sft_model_dir}"]
    sources = [f"reward.function={function_file}:reward", f"reward.url={url}"]
    dynamic = [
        "ppo.dynamic_sampling=true",
        "ppo.dynamic_sampling_rounds=2",
        "ppo.eval_every=2",
        "ppo.eval_prompts=16",
    ]
    return load_ppo_config(inputs, [*GROUP_OVERRIDES, *sources, *dynamic, *extra])


@pytest.fixture(scope="module")
def critic_free(ray_local, world_dir, sft_model_dir, function_file, gold_server, tmp_path_factory):
    """The 4-iteration critic-free run: its output, metrics, the HTTP calls and the roles of the actors
    it started (Ray's named actors right after start-up: ``{run}-{role}-{rank}``)."""
    from trainers.ppo import driver
    from trainers.runs.metrics import read_metrics

    url, calls = gold_server
    started: list[str] = []
    real_start = driver.start_roles

    def start_and_list(*args, **kwargs):
        roles = real_start(*args, **kwargs)
        run = kwargs["run_name"]
        started.extend(
            n.removeprefix(run + "-") for n in ray_local.util.list_named_actors() if n.startswith(run)
        )
        return roles

    out = tmp_path_factory.mktemp("critic_free") / "run"
    cfg = critic_free_config(
        world_dir, sft_model_dir, function_file, url, ["ppo.iterations=4", "ppo.checkpoint_every=2"]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "start_roles", start_and_list)
        summary = driver.run_ppo(cfg, out)
    return {
        "out": out,
        "summary": summary,
        "records": read_metrics(out / "metrics.jsonl"),
        "actors": sorted(started),
        "calls": list(calls),
    }


def test_critic_free_run_starts_no_critic_and_no_reward_model(critic_free):
    assert critic_free["actors"] == ["policy-0", "policy-1", "reference-0", "reward_function-0", "rollout-0"]
    assert not (critic_free["out"] / "checkpoints" / "iter_000004" / "critic").exists()
    for record in critic_free["records"]:
        assert not [k for k in record if k.startswith(("value/", "loss/value"))]  # absent, not zero


def test_function_and_endpoint_scores_are_logged_per_source_and_summed(critic_free):
    for r in critic_free["records"]:
        # The same scores through a pool of Ray actors and through HTTP, each logged, then summed.
        assert 0.0 < r["reward/function"] <= 1.0
        assert r["reward/url"] == pytest.approx(r["reward/function"], abs=1e-6)
        assert r["objective/score"] == pytest.approx(r["reward/function"] + r["reward/url"], abs=1e-5)
        assert r["loss/kl"] >= 0 and r["objective/kl_coef"] == 0.0
    assert critic_free["calls"][0] == 0  # the health check: an empty batch, before any actor started
    assert max(critic_free["calls"]) == 32  # then whole rollout batches


def test_dynamic_sampling_drops_groups_without_signal(critic_free):
    records = critic_free["records"]
    dropped = sum(r["sampling/dropped_groups"] for r in records)
    assert dropped > 0  # at least the constant tasks' groups
    for r in records:
        extra_prompts = r["sampling/prompts"] - 8
        assert (extra_prompts > 0) == (r["sampling/rounds"] > 1)
        assert r["sampling/filled_groups"] <= r["sampling/dropped_groups"]


def test_evaluation_while_training_every_2_iterations(critic_free):
    evals = [r for r in critic_free["records"] if "eval/score" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/score"] == pytest.approx(r["eval/reward/function"] + r["eval/reward/url"], abs=1e-5)
        assert r["eval/kl"] != 0.0 and 0 < r["eval/response_length"] <= 32
    assert evals[-1]["eval/kl"] > 0  # after 4 iterations the policy has moved away from the reference


def test_resumed_critic_free_run_matches_the_uninterrupted_one(
    critic_free, world_dir, sft_model_dir, function_file, gold_server, tmp_path
):
    from trainers.ppo.driver import run_ppo
    from trainers.runs.metrics import read_metrics

    url, _ = gold_server
    out = tmp_path / "run"
    # The uninterrupted run as it stood after iteration 2: its copy without the iteration-4 checkpoint
    # (the rerun cuts metrics.jsonl back to the checkpoint it resumes from).
    shutil.copytree(critic_free["out"], out)
    shutil.rmtree(out / "checkpoints" / "iter_000004")
    second = ["ppo.iterations=4", "ppo.checkpoint_every=2"]
    summary = run_ppo(critic_free_config(world_dir, sft_model_dir, function_file, url, second), out)
    assert summary["ppo/resumed_from_iteration"] == 2
    resumed, reference = read_metrics(out / "metrics.jsonl"), critic_free["records"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed[2:], reference[2:], strict=True):
        for key, value in want.items():
            if key.startswith(("timing/", "eval/")) or key == "step":
                continue
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (want["step"], key)


def test_rm_and_function_combined_with_weights(ray_local, world_dir, sft_model_dir, rm_model_dir, tmp_path):
    from trainers.ppo.driver import run_ppo

    inputs = ppo_inputs(world_dir, sft_model_dir, rm_model_dir)
    overrides = [
        *GROUP_OVERRIDES,
        "ppo.advantage=rloo",
        "ppo.loss_agg=token_mean",
        "ppo.iterations=2",
        "reward.function=trainers.data.gold:reward",
        "reward.weights={rm: 0.5, function: 2.0}",
    ]
    summary = run_ppo(load_ppo_config(inputs, overrides), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["objective/score"] == pytest.approx(
            0.5 * r["reward/rm"] + 2.0 * r["reward/function"], abs=1e-5
        )
        assert 0.0 < r["reward/function"] <= 1.0
    assert summary["ppo/iterations"] == 2


RAISING_FILE = """
from pathlib import Path

COUNTER = Path({counter!r})

def reward(prompts, responses, rows):
    calls = int(COUNTER.read_text()) if COUNTER.exists() else 0
    COUNTER.write_text(str(calls + 1))
    if calls == {fail_at} and Path({trigger!r}).exists():
        raise ValueError("verifier crashed")
    return [float(len(r) % 3) for r in responses]
"""


def test_raising_reward_function_stops_with_one_line_and_the_rerun_resumes(
    ray_local, world_dir, sft_model_dir, tmp_path
):
    """The function raises in iteration 2 (its second call): one ``rlhf: stopped:`` line naming the
    function, the row and the iteration-1 checkpoint, exit 3; the rerun resumes there and finishes. Both
    commands are drivers of the session's Ray."""
    trigger, counter = tmp_path / "fail", tmp_path / "calls"
    fn = tmp_path / "flaky.py"
    fn.write_text(RAISING_FILE.format(counter=str(counter), trigger=str(trigger), fail_at=1))
    trigger.write_text("")
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "trainers.cli", "ppo", "--config", str(TINY_CONFIG), "--out", str(out),
        f"data.dir={world_dir}", f"model.path={sft_model_dir}", f"reward.function={fn}:reward",
        *GROUP_OVERRIDES, "ppo.iterations=2", "ppo.checkpoint_every=1", "logging.progress=true",
        f"cluster.ray_address={ray_local.get_runtime_context().gcs_address}",
    ]  # fmt: skip
    env = subprocess_env(own_ray=True)
    first = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert first.returncode == 3, first.stderr[-3000:]
    stopped = [line for line in first.stderr.splitlines() if line.startswith("rlhf: stopped:")]
    assert len(stopped) == 1, first.stderr[-3000:]
    line = stopped[0]
    assert "ppo iteration 2" in line and f"reward.function='{fn}:reward'" in line
    assert "ValueError: verifier crashed" in line and "row 0" in line
    assert "iter_000001" in line  # the newest checkpoint a rerun resumes from
    trigger.unlink()
    second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "(iteration 1)" in second.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
