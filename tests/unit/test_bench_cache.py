"""The benches' cache keys (tests/bench/_bench_runs.py, used by alignment_tax.py; pure code, no Ray): a
cached PPO run or evaluation is reused only when it was made with the same settings and the same clean
commit, and recomputed otherwise, with one line naming what differed. And the estimators bench
(tests/bench/estimators.py): what each variant changes, its equal budget of sequences, its aggregates."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from tests.bench import _bench_runs as bench
from tests.conftest import REPO
from trainers.demo import DEFAULT_CONFIG
from trainers.errors import UserError
from trainers.evaluation.judges import wilson_interval


def load_bench(name: str):
    """A bench script as a module: tests/bench is no package, so it is loaded from its file (and
    registered, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "tests" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


atax = load_bench("alignment_tax")
CODE = {"commit": "a" * 40, "dirty": False, "versions": {"python": "3.11.7", "torch": "2.13.0"}}


def _key(code=CODE, **settings):
    return bench.cache_key({"ptx_coef": 0.5, "seed": 0} | settings, code)


class Compute:
    """A stand-in evaluation that counts how often it ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"value": self.calls}


# --------------------------------------------------------------------------------------------------
# Evaluations (cached JSON files)
# --------------------------------------------------------------------------------------------------


def test_same_settings_and_commit_reuse_the_evaluation(tmp_path, capsys):
    path, compute = tmp_path / "bench_eval.json", Compute()
    first = bench.cached(path, _key(), compute)
    again = bench.cached(path, _key(), compute)
    assert compute.calls == 1 and again == first == {"value": 1}
    assert json.loads((tmp_path / "bench_eval.key.json").read_text()) == _key()
    assert "not reused" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("later", "named"),
    [
        (_key(seed=1), "changed: settings.seed"),
        (_key(ptx_coef=2.0), "changed: settings.ptx_coef"),
        (_key(inputs={"sft": "other"}), "changed: settings.inputs"),
        (_key(code=CODE | {"commit": "b" * 40}), "changed: code.commit"),
        (
            _key(code=CODE | {"versions": {"python": "3.11.7", "torch": "2.14.0"}}),
            "changed: code.versions.torch",
        ),
        (_key(code=CODE | {"dirty": True}), "uncommitted changes"),
        (_key(code=CODE | {"commit": None}), "no git commit"),
    ],
    ids=["seed", "ptx_coef", "input", "commit", "package", "dirty", "no-git"],
)
def test_a_changed_setting_or_code_recomputes_and_says_what(tmp_path, capsys, later, named):
    path, compute = tmp_path / "bench_eval.json", Compute()
    bench.cached(path, _key(), compute)
    assert bench.cached(path, later, compute) == {"value": 2}
    assert compute.calls == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "not reused" in line]
    assert len(lines) == 1 and named in lines[0]
    assert json.loads(bench.key_file(path).read_text()) == later  # the new entry is keyed on what made it


def test_a_dirty_tree_never_reuses_not_even_its_own_entries(tmp_path):
    path, compute, dirty = tmp_path / "reference_eval.json", Compute(), _key(code=CODE | {"dirty": True})
    for _ in range(3):
        bench.cached(path, dirty, compute)
    assert compute.calls == 3
    bench.cached(path, _key(), compute)  # clean again, same commit: the dirty entry is not it either
    assert compute.calls == 4
    assert bench.stale_reason(dirty, _key()) == "changed: code.dirty"


def test_an_entry_without_a_key_or_with_a_broken_one_is_recomputed(tmp_path):
    path, compute = tmp_path / "bench_eval.json", Compute()
    path.write_text(json.dumps({"value": "from before cache keys"}))
    assert bench.cached(path, _key(), compute) == {"value": 1}
    bench.key_file(path).write_text("{not json")
    assert bench.cached(path, _key(), compute) == {"value": 2}


def test_key_compares_equal_after_a_round_trip_through_disk(tmp_path):
    key = bench.cache_key({"coefs": (0.0, 0.5), "path": tmp_path, "lr": 5e-5}, CODE)
    (tmp_path / "k.json").write_text(json.dumps(key))
    assert bench.stale_reason(bench.read_key(tmp_path / "k.json"), key) is None
    assert bench.differences({"a": {"b": 1}}, {"a": {"b": 1, "c": None}}) == ["a.c"]  # absent != None


# --------------------------------------------------------------------------------------------------
# PPO runs (directories)
# --------------------------------------------------------------------------------------------------


def _run_dir(tmp_path, key, finished=True):
    run = tmp_path / "runs" / "ptx0.5_seed0"
    (run / "checkpoints" / "iter_10").mkdir(parents=True)
    if key is not None:
        (run / bench.RUN_KEY).write_text(json.dumps(key))
    if finished:
        (run / "summary.json").write_text(json.dumps({"ppo/iterations": 30}))
    return run


def test_a_finished_run_with_the_same_key_is_reused(tmp_path):
    run = _run_dir(tmp_path, _key())
    assert bench.reuse_run(run, _key()) == {"ppo/iterations": 30}
    assert (run / "checkpoints").is_dir()


@pytest.mark.parametrize("recorded", [_key(seed=1), _key(code=CODE | {"commit": "b" * 40}), None])
def test_a_run_made_otherwise_is_removed_and_run_again(tmp_path, capsys, recorded):
    run = _run_dir(tmp_path, recorded)
    assert bench.reuse_run(run, _key(), tag=atax.TAG) is None
    assert sorted(p.name for p in run.iterdir()) == [bench.RUN_KEY]  # old checkpoints and summary gone
    assert json.loads((run / bench.RUN_KEY).read_text()) == _key()
    assert capsys.readouterr().out.startswith("alignment_tax: ptx0.5_seed0: earlier run not reused")


def test_an_interrupted_run_with_the_same_key_keeps_its_checkpoints(tmp_path):
    run = _run_dir(tmp_path, _key(), finished=False)
    assert bench.reuse_run(run, _key()) is None
    assert (run / "checkpoints" / "iter_10").is_dir()  # PPO resumes from them
    dirty = _key(code=CODE | {"dirty": True})
    assert bench.reuse_run(run, dirty) is None
    assert not (run / "checkpoints").exists()  # not under a dirty tree


# --------------------------------------------------------------------------------------------------
# What the keys hold: the resolved settings, the inputs' identity, the code
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path):
    """A demo output as far as the keys look: its config.yaml and the stages' summaries."""
    demo = tmp_path / "demo"
    demo.mkdir()
    shutil.copy(DEFAULT_CONFIG, demo / "config.yaml")
    for stage in bench.DEMO_STAGES:
        (demo / stage).mkdir()
        (demo / stage / "summary.json").write_text(json.dumps({f"{stage}/wall_time_s": 1.0}))
    return demo


def _run_key(demo, coef=0.5, seed=0, iterations=None, code=CODE):
    return bench.cache_key(bench.run_settings(atax.ppo_config(demo, coef, seed, iterations), demo), code)


def test_run_key_holds_the_resolved_config_and_the_demo_inputs(demo):
    key = _run_key(demo)
    config = key["settings"]["config"]
    assert (config["ppo"]["ptx_coef"], config["ppo"]["seed"]) == (0.5, 0)
    assert config["model"]["path"] == str(demo / "sft" / "model")
    assert config["reward"]["path"] == str(demo / "rm" / "model")
    assert set(key["settings"]["inputs"]) == set(bench.DEMO_STAGES)
    assert "cluster" not in config and "logging" not in config  # change no result (the demo's rule)
    assert bench.stale_reason(key, _run_key(demo)) is None


def test_run_key_changes_with_each_setting_and_input(demo):
    key = _run_key(demo)
    assert bench.differences(key, _run_key(demo, coef=0.0)) == ["settings.config.ppo.ptx_coef"]
    assert bench.differences(key, _run_key(demo, seed=1)) == ["settings.config.ppo.seed"]
    assert bench.differences(key, _run_key(demo, iterations=5)) == ["settings.config.ppo.iterations"]
    (demo / "config.yaml").write_text(
        (demo / "config.yaml").read_text().replace("kl_coef: 0.1", "kl_coef: 0.2")
    )
    assert bench.differences(key, _run_key(demo)) == ["settings.config.ppo.kl_coef"]
    (demo / "sft" / "summary.json").write_text(json.dumps({"sft/wall_time_s": 2.0}))  # SFT redone in place
    assert "settings.inputs.sft.sha256" in bench.differences(key, _run_key(demo))


def test_eval_key_follows_the_run_and_the_reference_it_reads(demo, tmp_path):
    out, run = tmp_path / "atax", tmp_path / "atax" / "runs" / "ptx0.5_seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"ppo/wall_time_s": 100.0}))
    (out / "reference_eval.json").write_text(json.dumps({"sft_responses": ["a"]}))
    cfg = atax.ppo_config(demo, 0.5, 0, None)
    key = bench.run_eval_key(demo, out, run, cfg, CODE)
    assert key["settings"]["sampling"] == {"max_new_tokens": 48, "temperature": 1.0, "seed": cfg.data.seed}
    assert bench.differences(key, bench.run_eval_key(demo, out, run, cfg, CODE | {"commit": "c" * 40})) == [
        "code.commit"
    ]
    (run / "summary.json").write_text(json.dumps({"ppo/wall_time_s": 101.0}))  # the run was redone
    (out / "reference_eval.json").write_text(json.dumps({"sft_responses": ["b"]}))
    assert bench.differences(key, bench.run_eval_key(demo, out, run, cfg, CODE)) == [
        "settings.inputs.reference.sha256",
        "settings.inputs.run.sha256",
    ]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_identity_sees_commits_and_uncommitted_changes_to_tracked_code(tmp_path):
    def git(*cmd):
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
        env |= {"GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True, env=env)

    (tmp_path / "tests" / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "tests" / "bench" / "results" / "alignment_tax.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    first = bench.code_identity(tmp_path)
    assert len(first["commit"]) == 40 and first["dirty"] is False and "python" in first["versions"]
    (tmp_path / "tests" / "bench" / "results" / "alignment_tax.json").write_text('{"new": 1}\n')
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert bench.code_identity(tmp_path)["dirty"] is False  # the bench's results and untracked files
    (tmp_path / "code.py").write_text("x = 2\n")
    assert bench.code_identity(tmp_path)["dirty"] is True
    git("commit", "-qam", "two")
    second = bench.code_identity(tmp_path)
    assert second["dirty"] is False and second["commit"] != first["commit"]
    assert bench.code_identity(tmp_path.parent / "nowhere")["commit"] is None


# --------------------------------------------------------------------------------------------------
# The estimators bench (tests/bench/estimators.py): what each variant changes, and its aggregates
# --------------------------------------------------------------------------------------------------

est = load_bench("estimators")
GROUPED = {"ppo.prompts_per_iteration": 8, "ppo.samples_per_prompt": 4}
GRPO = {"ppo.advantage": "grpo", "ppo.kl_coef": 0.0, "ppo.kl_loss_coef": 0.1} | GROUPED


@pytest.mark.parametrize(
    ("variant", "changed"),
    [
        ("ppo_ptx", {}),
        ("grpo_rm", GRPO),
        ("rloo_rm", {"ppo.advantage": "rloo"} | GROUPED),
        ("reinforce_pp_baseline_rm", {"ppo.advantage": "reinforce_pp_baseline"} | GROUPED),
        ("grpo_gold", GRPO | {"reward.path": None, "reward.function": "trainers.data.gold:reward"}),
    ],
)
def test_each_variant_changes_only_its_keys_at_the_demos_number_of_sequences(demo, variant, changed):
    grouping = est.group_sampling(demo)
    base = est.variant_config(demo, "ppo_ptx", 1, None, grouping)
    cfg = est.variant_config(demo, variant, 1, None, grouping)
    assert est.changed_settings(base, cfg) == changed
    assert est.sequences(cfg) == est.sequences(base) == 30 * 32  # tiny.yaml: 30 iterations x 32 x 1
    assert cfg.ppo.ptx_coef == base.ppo.ptx_coef > 0  # only the estimator (and KL placement) differs
    assert cfg.reward.sources() == (["function"] if variant == "grpo_gold" else ["rm"])
    assert est.sequences(est.variant_config(demo, variant, 1, 2, grouping)) == 2 * 32


def test_group_variants_need_the_demos_rows_to_split_into_groups(demo):
    text = (demo / "config.yaml").read_text()
    for old, new in [
        ("prompts_per_iteration: 32", "18"),
        ("mini_batch_size: 16", "6"),
        ("micro_batch_size: 8", "3"),
    ]:
        assert old in text
        text = text.replace(old, f"{old.split(':')[0]}: {new}")  # a valid PPO batch of 18 rows
    (demo / "config.yaml").write_text(text)
    with pytest.raises(UserError, match="18 sequences per PPO iteration, not a multiple of 4"):
        est.group_sampling(demo)


def test_variant_list_names_unknown_variants():
    assert est.variant_list("grpo_gold, ppo_ptx,grpo_gold") == ["grpo_gold", "ppo_ptx"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown variant.*grpo_mr"):
        est.variant_list("ppo_ptx,grpo_mr")


def test_pooled_win_rate_counts_every_seeds_comparisons_ties_as_half():
    counts = [{"wins": 2, "ties": 1, "losses": 1, "n": 4}, {"wins": 1, "ties": 0, "losses": 3, "n": 4}]
    pooled = est.pooled_win_rate(counts)
    assert pooled["win_rate"] == 3.5 / 8 and pooled["n"] == 8
    assert (pooled["ci_low"], pooled["ci_high"]) == wilson_interval(3.5, 8)


def test_iteration_times_sum_the_phases_and_spread_wall_time_over_the_iterations_run():
    records = [{"timing/generate": 1.0, "timing/train": 2.0, "loss/policy": 9.0}, {"timing/train": 5.0}]
    summary = {"ppo/iterations": 10, "ppo/resumed_from_iteration": 5, "ppo/wall_time_s": 100.0}
    assert est.iteration_times(records, summary) == {
        "iteration_time_s": 4.0,
        "wall_time_per_iteration_s": 20.0,
    }


def test_aggregate_gives_seed_spreads_pooled_intervals_and_the_rm_gold_gap():
    def record(variant, seed, gold, rm):
        counts = {"wins": 0, "ties": 0, "losses": 0, "n": 4}
        return {m: 1.0 for m in est.METRICS} | {
            "variant": variant,
            "seed": seed,
            "gold_win_rate": gold / 4,
            "rm_win_rate": rm / 4,
            "gold_counts": counts | {"wins": gold, "losses": 4 - gold},
            "rm_counts": counts | {"wins": rm, "losses": 4 - rm},
        }

    agg = est.aggregate([record("ppo_ptx", 0, 3, 3), record("grpo_rm", 0, 1, 4), record("grpo_rm", 1, 2, 4)])
    assert list(agg) == ["ppo_ptx", "grpo_rm"]
    g = agg["grpo_rm"]
    assert g["gold_win_rate"]["mean"] == 0.375 and g["gold_win_rate"]["n"] == 2
    assert g["gold_win_rate_pooled"]["win_rate"] == 3 / 8 and g["rm_win_rate_pooled"]["win_rate"] == 1.0
    assert g["rm_minus_gold_win_rate"] == 1.0 - 0.375  # the RM's preference far above gold's: hacking
    assert agg["ppo_ptx"]["gold_win_rate"]["sd"] is None  # one seed
