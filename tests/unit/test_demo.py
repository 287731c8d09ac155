"""`rlhf demo` orchestration without training: stage order, skipping and resuming, invalidation of
stale results, --fresh, the report summary, and the user errors that must stop it before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers import cli, demo
from trainers.config import load_config
from trainers.errors import ConfigError
from trainers.evaluation import demo_report
from trainers.evaluation.judges import win_rate_from_outcomes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(out, stage, summary):
    (out / stage).mkdir(parents=True, exist_ok=True)
    (out / stage / "summary.json").write_text(json.dumps(summary))
    return summary


def _fake_summary(stage, out):
    """What each real stage writes, with made-up numbers (PPO also writes its metrics.jsonl)."""
    if stage == "world":
        rows = {k: {"train": 10, "valid": 2, "test": 2} for k in ("demonstrations", "comparisons", "prompts")}
        return {"world/rows": rows | {"pretrain": {"train": 7}, "heldout": 4}, "world/wall_time_s": 1.0}
    if stage in ("pretrain", "sft"):
        return {f"{stage}/valid_loss": 2.0 if stage == "pretrain" else 1.3, f"{stage}/wall_time_s": 3.0}
    if stage == "rm":
        return {"rm/valid_accuracy": 0.8, "rm/wall_time_s": 4.0}
    if stage == "ppo":
        kls = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
        lines = [
            json.dumps({"step": i + 1, "objective/score": i * 0.1, "objective/kl": k})
            for i, k in enumerate(kls)
        ]
        (out / "ppo").mkdir(parents=True, exist_ok=True)
        (out / "ppo" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return {
            "ppo/score_first_quarter": -0.5,
            "ppo/score_last_quarter": 0.9,
            "ppo/objective/kl": 8.0,
            "ppo/loss/ptx": 2.2,
            "ppo/wall_time_s": 5.0,
        }
    gold = win_rate_from_outcomes([1.0] * 7 + [0.5] * 2 + [0.0])
    rm = win_rate_from_outcomes([1.0] * 9 + [0.0])
    scores = {
        name: {"score": s, "closing": c, "correct": 0.5}
        for name, s, c in (("sft", 0.5, 0.3), ("ppo_ptx", 0.7, 0.9))
    }
    return {
        "eval/win_rate_gold": gold,
        "eval/win_rate_rm": rm,
        "eval/gold_scores": scores,
        "eval/pretrain_loss": {"base": 1.1, "sft": 1.4, "ppo_ptx": 1.3},
        "eval/heldout_accuracy": {
            "base": 0.3,
            "sft": 0.4,
            "ppo_ptx": 0.45,
            "cluster": "sentiment",
            "chance": 0.5,
        },
        "eval/wall_time_s": 2.0,
    }


@pytest.fixture
def fake(monkeypatch):
    """Fake stage runners that record their calls and write what the real ones would."""
    calls: list[str] = []

    def make(stage):
        def run(configs, out):
            assert configs[stage if stage in demo.RAY_STAGES else "base"].data.dir == str(out / "world")
            calls.append(stage)
            return _write(out, stage, _fake_summary(stage, out))

        return run

    runners = {stage: make(stage) for stage, _ in demo.STAGES[:-1]}
    return calls, runners


def test_full_run_calls_every_stage_in_order_and_writes_the_report(tmp_path, fake, capsys):
    calls, runners = fake
    out = tmp_path / "demo"
    summary = demo.run_demo(None, [], out, runners=runners)
    assert calls == ["world", "pretrain", "sft", "rm", "ppo", "eval"]
    written = json.loads((out / "report" / "summary.json").read_text())
    assert written == summary
    assert written["gold_win_rate_vs_sft"] == pytest.approx(0.8)
    assert written["target_met"] is True
    assert written["rm_valid_accuracy"] == 0.8
    assert written["kl_to_sft"] == pytest.approx(7.0)  # mean of the last quarter (6, 8) of 8 iterations
    assert written["pretrain_loss"] == {"base": 1.1, "sft": 1.4, "ppo_ptx": 1.3}
    assert written["gold_win_rate_ci95"][0] < 0.8 < written["gold_win_rate_ci95"][1]
    assert set(written["timings_s"]) == {"world", "pretrain", "sft", "rm", "ppo", "eval", "report"}
    assert written["wall_time_s"] >= 0 and written["stages_skipped"] == []
    assert "PPO-ptx vs SFT (gold)" in written["win_rates"]  # write_report's own keys are kept
    assert (out / "report" / "report.png").read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    for line in (
        "[1/7] synthetic world ...",
        "[3/7] SFT ...",
        "SFT: valid loss 1.300",
        "RM: valid accuracy 0.800",
    ):
        assert line in text
    assert "target gold win rate >= 0.6: met" in text
    assert "gold_win_rate_vs_sft" in text  # the final table


def test_rerun_skips_stages_with_a_summary(tmp_path, fake, capsys):
    calls, runners = fake
    out = tmp_path / "demo"
    demo.run_demo(None, [], out, runners=runners)
    calls.clear()
    capsys.readouterr()
    summary = demo.run_demo(None, [], out, runners=runners)
    assert calls == []
    assert summary["stages_skipped"] == ["world", "pretrain", "sft", "rm", "ppo", "eval"]
    assert summary["timings_s"]["rm"] == 4.0  # the stage's recorded time
    text = capsys.readouterr().out
    assert "[4/7] reward model: done earlier, skipped" in text
    assert "RM: valid accuracy 0.800 (4 s) [earlier run]" in text


def test_a_rerun_stage_invalidates_the_later_ones(tmp_path, fake):
    calls, runners = fake
    out = tmp_path / "demo"
    demo.run_demo(None, [], out, runners=runners)
    (out / "sft" / "summary.json").unlink()
    (out / "rm" / "stale.txt").write_text("from the old SFT model")
    calls.clear()
    demo.run_demo(None, [], out, runners=runners)
    assert calls == ["sft", "rm", "ppo", "eval"]
    assert not (out / "rm" / "stale.txt").exists()


def test_fresh_starts_over(tmp_path, fake):
    calls, runners = fake
    out = tmp_path / "demo"
    demo.run_demo(None, [], out, runners=runners)
    (out / "world" / "old.txt").write_text("x")
    (out / "notes.txt").write_text("the user's own file")
    calls.clear()
    demo.run_demo(None, [], out, fresh=True, runners=runners)
    assert calls == ["world", "pretrain", "sft", "rm", "ppo", "eval"]
    assert not (out / "world" / "old.txt").exists()
    assert (out / "notes.txt").exists()  # only the stage directories are removed


def test_changed_settings_rerun_from_the_first_stage_they_affect(tmp_path, fake, capsys):
    calls, runners = fake
    out = tmp_path / "demo"
    demo.run_demo(None, [], out, runners=runners)
    calls.clear()
    demo.run_demo(None, ["logging.log_every=3", "cluster.num_cpus=6"], out, runners=runners)
    assert calls == []  # these change no result
    demo.run_demo(None, ["ppo.policy_lr=0.5"], out, runners=runners)
    assert calls == ["ppo", "eval"]
    assert "ppo.policy_lr changed since the last run" in capsys.readouterr().out
    calls.clear()
    demo.run_demo(None, ["ppo.policy_lr=0.5", "sft.lr=0.1"], out, runners=runners)
    assert calls == ["sft", "rm", "ppo", "eval"]
    calls.clear()
    demo.run_demo(None, ["ppo.policy_lr=0.5", "sft.lr=0.1"], out, runners=runners)
    assert calls == []  # the recorded config is the new one


def test_first_changed_stage():
    assert demo.first_changed_stage(["ppo.kl_coef", "rm.lr"]) == "rm"
    assert demo.first_changed_stage(["rollout.max_new_tokens"]) == "ppo"
    assert demo.first_changed_stage(["data.synth_scale", "sft.epochs"]) == "world"
    assert demo.first_changed_stage([]) is None


def test_config_differences_ignore_neutral_sections_and_owned_keys():
    old = {
        "ppo": {"kl_coef": 0.02, "iterations": 5},
        "cluster": {"num_cpus": 8},
        "data": {"dir": "/a", "seed": 0},
    }
    new = {
        "ppo": {"kl_coef": 0.05, "iterations": 5},
        "cluster": {"num_cpus": 4},
        "data": {"dir": "/b", "seed": 1},
    }
    assert demo.config_differences(old, new) == ["data.seed", "ppo.kl_coef"]


@pytest.mark.parametrize("key", ["data.dir", "model.path", "reward.path", "model.tokenizer"])
def test_overriding_a_path_the_demo_owns_is_a_user_error(tmp_path, key):
    with pytest.raises(ConfigError, match=key):
        demo.prepare(None, [f"{key}=/elsewhere"], tmp_path / "demo", fresh=False)


def test_stage_configs_chain_the_models(tmp_path):
    out = tmp_path / "demo"
    configs = demo.stage_configs(demo.DEFAULT_CONFIG, ["ppo.iterations=3"], out)
    assert configs["pretrain"].model.path is None and configs["pretrain"].model.preset == "tiny"
    assert configs["sft"].model.path == str(out / "pretrain" / "model")
    assert configs["rm"].model.path == str(out / "sft" / "model")
    assert configs["ppo"].model.path == str(out / "sft" / "model")
    assert configs["ppo"].reward.path == str(out / "rm" / "model")
    assert all(configs[s].data.dir == str(out / "world") for s in ("base", *demo.RAY_STAGES))
    assert configs["ppo"].ppo.iterations == 3  # the user's overrides reach every stage


def test_default_config_is_a_ppo_ptx_run():
    cfg = load_config(demo.DEFAULT_CONFIG)
    assert cfg.ppo.ptx_coef > 0
    assert cfg.ppo.iterations >= 1 and cfg.cluster.num_cpus >= 6  # policy 2 + critic + ref + RM + engine


def test_kl_to_sft_is_the_last_quarter_mean():
    records = [{"objective/kl": float(k)} for k in range(1, 9)] + [{"objective/kl": None}]
    assert demo_report.kl_to_sft(records) == pytest.approx(7.5)
    assert demo_report.kl_to_sft([{"objective/kl": 2.0}]) == 2.0
    assert demo_report.kl_to_sft([{"objective/score": 1.0}]) is None


def test_result_lines(tmp_path):
    out = tmp_path
    assert demo_report.result_line("sft", _fake_summary("sft", out), 118.4) == "SFT: valid loss 1.300 (118 s)"
    assert (
        demo_report.result_line("pretrain", _fake_summary("pretrain", out))
        == "pretrain: valid loss 2.000 (3 s)"
    )
    ppo = demo_report.result_line("ppo", _fake_summary("ppo", out), 200)
    assert (
        ppo
        == "PPO-ptx: RM score -0.50 -> 0.90 (first -> last quarter), last KL to SFT 8.00, ptx loss 2.200 (200 s)"
    )
    ev = demo_report.result_line("eval", _fake_summary("eval", out))
    assert ev.startswith("evaluation: gold win rate of PPO-ptx over SFT 0.800 [95% CI 0.")
    assert "gold score SFT 0.500 -> PPO-ptx 0.700 (2 s)" in ev


def test_cli_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("rlhf: error: output directory") and "not a directory" in err[0]
    )
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "ppo.kl_coeff=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo.kl_coef" in err[0]  # unknown key, with the suggestion
    assert cli.main(["demo", "--out", str(out), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_unwritable_out_is_a_user_error(tmp_path, capsys, where):
    """Places nobody can write to, root included (CI runs as root, whom permission bits do not stop):
    below a regular file, and in /proc, which refuses to create anything even where root's permission
    check lets it through."""
    blocker = tmp_path.resolve() / "file"
    blocker.write_text("x")
    probe = blocker if where == "under_a_file" else Path("/proc")
    out = probe / "rlhf-test" / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rlhf: error: output directory '{out}' is not writable ('{probe}' does not allow it)"
    ]


def test_register_adds_the_demo_command():
    from trainers.cli import _Parser

    parser = _Parser(prog="rlhf")
    demo.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "ppo.iterations=2"])
    assert args.func is demo._run
    assert (args.out, args.config, args.fresh, args.overrides) == (
        "runs/demo",
        None,
        False,
        ["ppo.iterations=2"],
    )
