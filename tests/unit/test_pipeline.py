"""`rlhf pipeline` without training: which stages run and rerun for which changed keys, skipping finished
stages, the paths it hands from stage to stage, its own keys, the ptx decision, where it finds the
user's data, and the user errors that stop it before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_CONFIG, subprocess_env
from trainers import cli, pipeline
from trainers.config import load_config
from trainers.errors import ConfigError, UserError
from trainers.evaluation import demo_report
from trainers.evaluation.judges import win_rate_from_outcomes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_model_dir(path, *, tokenizer=True):
    """A directory that passes the model-directory checks but holds no loadable model."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"not really")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_data(root, *, pretrain=True, test_prompts=True):
    """A data directory as a user brings it: JSONL files per kind and split."""
    write_jsonl(root / "demonstrations" / "train.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    write_jsonl(
        root / "comparisons" / "train.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}]
    )
    write_jsonl(root / "prompts" / "train.jsonl", [{"prompt": "Hi?"}])
    write_jsonl(root / "prompts" / "valid.jsonl", [{"prompt": "Valid?"}])
    if test_prompts:
        write_jsonl(root / "prompts" / "test.jsonl", [{"prompt": "Test?"}, {"prompt": "Two?"}])
    if pretrain:
        write_jsonl(root / "pretrain" / "train.jsonl", [{"text": "Some text."}])
        write_jsonl(root / "pretrain" / "valid.jsonl", [{"text": "Held-out text."}])
    return root


@pytest.fixture
def inputs(tmp_path):
    """``(config overrides naming the user's model and data, model dir, data dir)``."""
    model = fake_model_dir(tmp_path / "my-instruct")
    data = user_data(tmp_path / "data")
    return [f"model.path={model}", f"data.dir={data}"], model, data


def _fake_summary(stage, out):
    """What each real stage writes, with made-up numbers (PPO also writes its metrics.jsonl)."""
    if stage == "sft":
        return {"sft/valid_loss": 1.3, "sft/wall_time_s": 3.0}
    if stage == "rm":
        return {"rm/valid_accuracy": 0.7, "rm/wall_time_s": 4.0}
    if stage == "ppo":
        lines = [
            json.dumps({"step": i + 1, "objective/score": i * 0.1, "objective/kl": float(i)})
            for i in range(8)
        ]
        (out / "ppo").mkdir(parents=True, exist_ok=True)
        (out / "ppo" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return {"ppo/score_first_quarter": -0.2, "ppo/score_last_quarter": 0.6, "ppo/objective/kl": 7.0}
    rm = win_rate_from_outcomes([1.0] * 6 + [0.5] * 2 + [0.0] * 2) | {"score_a": 0.9, "score_b": 0.1}
    return {
        "eval/win_rate_rm": rm,
        "eval/pretrain_loss": {"start": 2.0, "sft": 2.2, "ppo": 2.1},
        "eval/prompts": "p.jsonl",
        "eval/wall_time_s": 2.0,
    }


@pytest.fixture
def fake():
    """Fake stage runners that record the stage and its configs, and write what the real ones would."""
    calls: list[str] = []
    seen: dict[str, dict] = {}

    def make(stage):
        def run(configs, out):
            calls.append(stage)
            seen[stage] = configs
            summary = _fake_summary(stage, out)
            (out / stage).mkdir(parents=True, exist_ok=True)
            (out / stage / "summary.json").write_text(json.dumps(summary))
            return summary

        return run

    return calls, seen, {stage: make(stage) for stage in ("sft", "rm", "ppo", "eval")}


def _run(overrides, out, runners, fresh=False):
    return pipeline.run_pipeline(TINY_CONFIG, overrides, out, fresh=fresh, runners=runners)


# --- the run ----------------------------------------------------------------------------------------------


def test_full_run_chains_the_models_and_writes_the_report(tmp_path, inputs, fake, capsys):
    overrides, model, data = inputs
    calls, seen, runners = fake
    out = tmp_path / "run"
    summary = _run(overrides, out, runners)
    assert calls == ["sft", "rm", "ppo", "eval"]
    configs = seen["sft"]
    assert configs["sft"].model.path == str(model) and configs["sft"].reward.path is None
    assert configs["rm"].model.path == str(out / "sft" / "model") and configs["rm"].model.tokenizer is None
    assert configs["ppo"].model.path == str(out / "sft" / "model")
    assert configs["ppo"].reward.path == str(out / "rm" / "model")
    assert all(configs[s].data.dir == str(data) for s in ("base", "sft", "rm", "ppo"))
    written = json.loads((out / "report" / "summary.json").read_text())
    assert written == summary
    assert written["rm_win_rate_vs_sft"] == pytest.approx(0.7)
    assert written["rm_mean_score"] == {"sft": 0.1, "ppo": 0.9}
    assert written["rm_valid_accuracy"] == 0.7 and written["kl_to_sft"] == pytest.approx(6.5)
    assert written["pretrain_loss"] == {"start": 2.0, "sft": 2.2, "ppo": 2.1}
    assert written["ptx"]["on"] is True and written["start_model"] == str(model)
    assert "gold_win_rate_vs_sft" not in written  # no gold judge on the user's data
    assert set(written["timings_s"]) == {"sft", "rm", "ppo", "eval", "report"}
    assert (out / "report" / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert "rm_win_rate_vs_sft" in (out / "report" / "report.txt").read_text()
    recorded = load_config(out / "config.yaml")
    assert recorded.model.path == str(model) and recorded.reward.path is None
    text = capsys.readouterr().out
    for line in (
        "pipeline: PPO-ptx with ppo.ptx_coef=0.5 on",
        "[1/5] SFT ...",
        "[3/5] PPO-ptx ...",
        "RM: valid accuracy 0.700",
        "evaluation: RM win rate of PPO over SFT 0.700 [95% CI",
        "mean RM score SFT 0.100 -> PPO 0.900",
        "[5/5] report ...",
        "RM win rate of PPO over SFT: 0.700",
        "optimistic bound",
    ):
        assert line in text


def test_rerun_skips_finished_stages_with_their_result_lines(tmp_path, inputs, fake, capsys):
    overrides, _, _ = inputs
    calls, _, runners = fake
    out = tmp_path / "run"
    _run(overrides, out, runners)
    calls.clear()
    capsys.readouterr()
    summary = _run(overrides, out, runners)
    assert calls == []
    assert summary["stages_skipped"] == ["sft", "rm", "ppo", "eval"]
    text = capsys.readouterr().out
    assert "[2/5] reward model: done earlier, skipped" in text
    assert "RM: valid accuracy 0.700 (4 s) [earlier run]" in text


@pytest.mark.parametrize(
    "change, rerun",
    [
        (["ppo.kl_coef=0.3"], ["ppo", "eval"]),
        (["rollout.max_new_tokens=20"], ["ppo", "eval"]),
        (["rm.lr=0.001"], ["rm", "ppo", "eval"]),
        (["sft.lr=0.001"], ["sft", "rm", "ppo", "eval"]),
        (["model.max_len=200"], ["sft", "rm", "ppo", "eval"]),
        (["data.overlong=error"], ["sft", "rm", "ppo", "eval"]),
        (["pretrain.lr=0.01", "logging.log_every=3", "cluster.num_cpus=6"], []),  # change no result
    ],
)
def test_a_changed_setting_reruns_from_the_first_stage_it_affects(tmp_path, inputs, fake, change, rerun):
    overrides, _, _ = inputs
    calls, _, runners = fake
    out = tmp_path / "run"
    _run(overrides, out, runners)
    (out / "ppo" / "stale.txt").write_text("from the old run")
    calls.clear()
    _run(overrides + change, out, runners)
    assert calls == rerun
    assert (out / "ppo" / "stale.txt").exists() == ("ppo" not in rerun)
    calls.clear()
    _run(overrides + change, out, runners)
    assert calls == []  # the recorded config is the new one


def test_another_starting_model_reruns_everything(tmp_path, inputs, fake, capsys):
    overrides, _, _ = inputs
    calls, _, runners = fake
    out = tmp_path / "run"
    _run(overrides, out, runners)
    other = fake_model_dir(tmp_path / "other-model")
    calls.clear()
    _run([f"model.path={other}", overrides[1]], out, runners)
    assert calls == ["sft", "rm", "ppo", "eval"]
    assert "model.path changed since the last run" in capsys.readouterr().out


def test_a_rerun_stage_invalidates_the_later_ones(tmp_path, inputs, fake):
    overrides, _, _ = inputs
    calls, _, runners = fake
    out = tmp_path / "run"
    _run(overrides, out, runners)
    (out / "rm" / "summary.json").unlink()  # e.g. interrupted
    (out / "eval" / "stale.txt").write_text("x")
    calls.clear()
    _run(overrides, out, runners)
    assert calls == ["rm", "ppo", "eval"]
    assert not (out / "eval" / "stale.txt").exists()


def test_fresh_starts_over_and_keeps_other_files(tmp_path, inputs, fake):
    overrides, _, _ = inputs
    calls, _, runners = fake
    out = tmp_path / "run"
    _run(overrides, out, runners)
    (out / "notes.txt").write_text("the user's own file")
    calls.clear()
    _run(overrides, out, runners, fresh=True)
    assert calls == ["sft", "rm", "ppo", "eval"]
    assert (out / "notes.txt").exists()


# --- planning -----------------------------------------------------------------------------------------


def test_first_changed_stage_per_key():
    layout = pipeline.pipeline_layout()
    assert layout.first_changed_stage(["ppo.kl_coef", "rm.lr"]) == "rm"
    assert layout.first_changed_stage(["data.comparisons"]) == "rm"
    assert layout.first_changed_stage(["data.prompts", "reward.score_clip"]) == "ppo"
    assert layout.first_changed_stage(["data.pretrain"]) == "ppo"
    assert layout.first_changed_stage(["data.dir", "ppo.kl_coef"]) == "sft"
    assert layout.first_changed_stage(["model.path"]) == "sft"
    assert layout.first_changed_stage(["pretrain.lr"]) is None
    assert layout.first_changed_stage([]) is None


def test_config_differences_skip_the_owned_reward_path_but_not_the_users_model():
    layout = pipeline.pipeline_layout()
    old = {"model": {"path": "/a"}, "reward": {"path": "/x"}, "logging": {"log_every": 1}}
    new = {"model": {"path": "/b"}, "reward": {"path": "/y"}, "logging": {"log_every": 5}}
    assert layout.config_differences(old, new) == ["model.path"]


def test_ppo_title_says_whether_ptx_is_on():
    assert dict(pipeline.pipeline_layout(True).stages)["ppo"] == "PPO-ptx"
    assert dict(pipeline.pipeline_layout(False).stages)["ppo"] == "PPO (ptx off)"
    assert [name for name, _ in pipeline.pipeline_layout().stages] == ["sft", "rm", "ppo", "eval", "report"]


def test_ptx_decision(tmp_path):
    text = tmp_path / "pretrain.jsonl"
    assert pipeline.ptx_decision(0.5, text, "x") == (
        True,
        f"pipeline: PPO-ptx with ppo.ptx_coef=0.5 on '{text}'",
    )
    on, line = pipeline.ptx_decision(0.0, text, "x")
    assert not on and "ppo.ptx_coef=0" in line
    on, line = pipeline.ptx_decision(0.0, None, "'D/pretrain/train'")
    assert not on and line.startswith("pipeline: ptx off: no pretraining data found ('D/pretrain/train')")
    with pytest.raises(ConfigError, match=r"ppo.ptx_coef=0.5 needs pretraining text.*set ppo.ptx_coef=0"):
        pipeline.ptx_decision(0.5, None, "x")


def test_without_pretraining_text_ptx_is_off_with_one_line(tmp_path, fake, capsys):
    model = fake_model_dir(tmp_path / "m")
    data = user_data(tmp_path / "data", pretrain=False)
    calls, seen, runners = fake
    summary = _run([f"model.path={model}", f"data.dir={data}", "ppo.ptx_coef=0"], tmp_path / "run", runners)
    assert calls == ["sft", "rm", "ppo", "eval"] and seen["ppo"]["ppo"].ppo.ptx_coef == 0
    assert summary["ptx"]["on"] is False
    text = capsys.readouterr().out
    assert sum("ptx off: no pretraining data found" in line for line in text.splitlines()) == 1
    assert "[3/5] PPO (ptx off) ..." in text


def test_ptx_coef_without_pretraining_text_is_a_user_error_before_anything_is_written(tmp_path, fake):
    model = fake_model_dir(tmp_path / "m")
    data = user_data(tmp_path / "data", pretrain=False)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="ppo.ptx_coef=0.5 needs pretraining text"):
        _run([f"model.path={model}", f"data.dir={data}"], out, fake[2])  # tiny.yaml: ptx_coef 0.5
    assert not out.exists()


# --- the user's inputs ----------------------------------------------------------------------------------


def test_locate_data_is_where_the_stages_read(tmp_path):
    data = load_config(None, [f"data.dir={tmp_path}"]).data
    assert pipeline.locate_data(data, "prompts", "train") is None
    assert "prompts/train.parquet: file not found" in pipeline.describe_location(data, "prompts", "train")
    write_jsonl(tmp_path / "prompts" / "train.jsonl", [{"prompt": "x"}])
    assert pipeline.locate_data(data, "prompts", "train") == tmp_path / "prompts" / "train.jsonl"
    (tmp_path / "prompts" / "test").mkdir()  # a datasets save_to_disk split
    (tmp_path / "prompts" / "test" / "data-00000-of-00001.arrow").write_bytes(b"")
    (tmp_path / "prompts" / "test" / "state.json").write_text("{}")
    assert pipeline.locate_data(data, "prompts", "test") == tmp_path / "prompts" / "test"
    split = load_config(None, [f"data.prompts={tmp_path}/p-{{split}}.jsonl"]).data
    write_jsonl(tmp_path / "p-valid.jsonl", [{"prompt": "x"}])
    assert pipeline.locate_data(split, "prompts", "valid") == tmp_path / "p-valid.jsonl"
    assert pipeline.locate_data(split, "prompts", "test") is None
    single = load_config(None, [f"data.prompts={tmp_path}/p-valid.jsonl"]).data
    assert pipeline.locate_data(single, "prompts", "valid") == tmp_path / "p-valid.jsonl"  # every split


def test_eval_prompts_are_test_else_valid(tmp_path):
    model = fake_model_dir(tmp_path / "m")
    data = user_data(tmp_path / "data")
    cfg = load_config(TINY_CONFIG, [f"model.path={model}", f"data.dir={data}"])
    assert pipeline.check_inputs(cfg).eval_prompts == data / "prompts" / "test.jsonl"
    (data / "prompts" / "test.jsonl").unlink()
    found = pipeline.check_inputs(cfg)
    assert found.eval_prompts == data / "prompts" / "valid.jsonl"
    assert found.pretrain_eval == data / "pretrain" / "valid.jsonl" and found.ptx
    (data / "prompts" / "valid.jsonl").unlink()
    with pytest.raises(ConfigError, match="no held-out prompts for the evaluation"):
        pipeline.check_inputs(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.dir={data}"], "model.path is not set: rlhf pipeline starts from your model"),
        (["model.path={tmp}/nowhere", "data.dir={data}"], "model.path='.*nowhere' does not exist"),
        (
            ["model.path={model}", "data.dir={data}", "reward.path={model}"],
            "override 'reward.path' is set by",
        ),
        (
            ["model.path={model}", "data.dir={tmp}/empty"],
            "no demonstrations for SFT: .*demonstrations/train.parquet: file not found",
        ),
        (["model.path={model}"], "no demonstrations for SFT: data.dir is not set.*data.demonstrations"),
        (["model.path={model}", "data.dir={data}", "ppo.kl_coeff=0.1"], "ppo.kl_coef"),
    ],
)
def test_user_errors_before_anything_is_written(tmp_path, fake, overrides, message):
    model = fake_model_dir(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    data = user_data(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        _run([o.format(tmp=tmp_path, model=model, data=data) for o in overrides], out, fake[2])
    assert not out.exists() and fake[0] == []


def test_missing_comparisons_name_the_rm():
    data = load_config(None, ["data.demonstrations=/x/{split}.jsonl"]).data
    assert (
        pipeline.describe_location(data, "demonstrations", "valid")
        == "/x/valid.jsonl: file not found (data.demonstrations=/x/{split}.jsonl)"
    )
    assert "data.dir is not set" in pipeline.describe_location(data, "comparisons", "train")


def test_cli_missing_model_path_or_bad_config_exit_2_with_one_line_and_write_nothing(tmp_path):
    """Through the real command line in a subprocess: before any stage, nothing under --out."""
    data = user_data(tmp_path / "data")
    out = tmp_path / "run"
    base = [sys.executable, "-m", "trainers.cli", "pipeline", "--config", str(TINY_CONFIG), "--out", str(out)]
    cases = [
        ([f"data.dir={data}"], "model.path is not set"),
        ([f"data.dir={data}", f"model.path={tmp_path / 'm'}", "ppo.kl_coeff=0.1"], "ppo.kl_coef"),
    ]
    for extra, message in cases:
        proc = subprocess.run(
            base + extra, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("rlhf: error:") and message in lines[0], lines
        assert proc.stdout == "" and not out.exists()


def test_cli_needs_config_and_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pipeline", "--out", "x"])
    assert exit_info.value.code == 2
    assert "--config" in capsys.readouterr().err


# --- the code path is real: the stage functions the stage commands call ----------------------------------


def test_ray_stages_call_the_stage_commands_functions(tmp_path, monkeypatch):
    import cluster.connect
    import trainers.ppo.driver
    import trainers.stages

    called = []
    monkeypatch.setattr(cluster.connect, "connect", lambda *a, **k: called.append(("connect", a, k)))
    for module, name in (
        (trainers.stages, "run_sft"),
        (trainers.stages, "run_rm"),
        (trainers.ppo.driver, "run_ppo"),
    ):
        monkeypatch.setattr(
            module, name, lambda cfg, out, _n=name: called.append((_n, cfg, out)) or {"n": _n}
        )
    configs = {stage: load_config(TINY_CONFIG) for stage in ("sft", "rm", "ppo")}
    runners = pipeline.default_runners(None)
    for stage in ("sft", "rm", "ppo"):
        assert runners[stage](configs, tmp_path) == {"n": f"run_{stage}"}
        assert called[-1] == (f"run_{stage}", configs[stage], tmp_path / stage)
        assert called[-2][0] == "connect" and called[-2][2]["num_cpus"] == configs[stage].cluster.num_cpus
    with pytest.raises(ValueError):
        pipeline.ray_stage("eval")


def test_evaluation_samples_heldout_prompts_and_judges_with_the_rm(tmp_path, monkeypatch):
    from trainers.evaluation import generation, judges, lm_loss

    model = fake_model_dir(tmp_path / "m")
    data = user_data(tmp_path / "data")
    cfg = load_config(TINY_CONFIG, [f"model.path={model}", f"data.dir={data}"])
    inputs = pipeline.check_inputs(cfg)
    out = tmp_path / "run"

    def generate(path, prompts, **kwargs):
        assert kwargs["seed"] == cfg.data.seed and kwargs["max_new_tokens"] == cfg.rollout.max_new_tokens
        return [
            f"{path.parent.name}: {p}" + ("!" * len(p) if path.parent.name == "ppo" else "") for p in prompts
        ]

    class LengthJudge:
        name = "rm"

        def __init__(self, rm_dir, batch_size):
            assert rm_dir == out / "rm" / "model"

        def scores(self, prompts, responses):
            return [float(len(r)) for r in responses]

    losses = []
    monkeypatch.setattr(generation, "generate", generate)
    monkeypatch.setattr(judges, "RewardModelJudge", LengthJudge)
    monkeypatch.setattr(
        lm_loss, "pretrain_loss", lambda d, texts, max_len: losses.append((d, texts)) or float(len(losses))
    )
    summary = pipeline.evaluation_runner(inputs)({"base": cfg}, out)
    assert summary["eval/win_rate_rm"]["win_rate"] == 1.0 and summary["eval/win_rate_rm"]["n"] == 2
    assert summary["eval/prompts"] == str(data / "prompts" / "test.jsonl")
    assert summary["eval/examples"][0] == {"prompt": "Test?", "sft": "sft: Test?", "ppo": "ppo: Test?!!!!!"}
    assert summary["eval/pretrain_loss"] == {"start": 1.0, "sft": 2.0, "ppo": 3.0}
    assert [d for d, _ in losses] == [model, out / "sft" / "model", out / "ppo" / "model"]
    assert losses[0][1] == ["Held-out text."]  # pretrain/valid, not the ptx text
    assert json.loads((out / "eval" / "summary.json").read_text())["eval/win_rate_rm"]["wins"] == 2
    assert demo_report.result_line("eval", summary).startswith(
        "evaluation: RM win rate of PPO over SFT 1.000"
    )


def test_ppo_result_line_without_ptx():
    s = {"ppo/score_first_quarter": 0.1, "ppo/score_last_quarter": 0.5, "ppo/objective/kl": 2.0}
    assert demo_report.result_line("ppo", s, 10) == (
        "PPO: RM score 0.10 -> 0.50 (first -> last quarter), last KL to SFT 2.00 (ptx off) (10 s)"
    )
