"""Metrics sinks (trainers/runs/sinks.py): TensorBoard and optional W&B, fed by MetricsWriter, with a fake ``wandb``
module injected in ``sys.modules`` (the real package is an optional extra and needs no network here)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from trainers.config import LoggingConfig, config_from_dict
from trainers.errors import ConfigError
from trainers.runs.metrics import MetricsWriter, read_metrics
from trainers.runs.sinks import MISSING_PACKAGE, check_wandb, open_sinks, run_name, wandb_importable


class FakeRun:
    """Records what a W&B run was asked to do."""

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def log(self, data, step):
        self.logged.append((data, step))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module whose ``init`` records its arguments and returns a :class:`FakeRun`."""
    module = types.ModuleType("wandb")
    module.inits = []
    module.runs = []

    def init(**kwargs):
        module.inits.append(kwargs)
        module.runs.append(FakeRun())
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.fixture
def no_wandb(monkeypatch):
    """Make ``import wandb`` fail, as with the package not installed (a None entry blocks imports)."""
    monkeypatch.setitem(sys.modules, "wandb", None)


def wandb_only(project, mode="online") -> LoggingConfig:
    """A logging section with W&B on and TensorBoard off (the tests look at W&B alone)."""
    return LoggingConfig(tensorboard=False, wandb_project=project, wandb_mode=mode)


def test_writer_sends_every_step_to_one_run_and_finishes_it_on_close(fake_wandb, tmp_path):
    out = tmp_path / "demo" / "sft"
    run_config = {"sft": {"lr": 5e-4}, "logging": {"wandb_project": "rlhf-test"}}
    writer = MetricsWriter(out, "sft", open_sinks(out, wandb_only("rlhf-test", "offline"), run_config))
    writer.log(1, {"loss": 3.0, "epoch": 0, "finite": True})
    writer.log(2, {"loss": 2.5, "grad_norm": float("inf")})
    writer.close()
    writer.close()  # closing twice finishes the run once

    assert len(fake_wandb.inits) == 1
    init = fake_wandb.inits[0]
    assert (init["project"], init["mode"], init["name"]) == ("rlhf-test", "offline", "demo/sft")
    assert init["config"] == run_config
    assert init["dir"] == str(out)  # wandb's own files go to OUT/wandb/, not the cwd
    run = fake_wandb.runs[0]
    # numeric values only, named as in TensorBoard; inf became None in the record and is left out
    assert run.logged == [({"sft/loss": 3.0, "sft/epoch": 0}, 1), ({"sft/loss": 2.5}, 2)]
    assert run.finished == 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # the file is unchanged


def test_the_factory_builds_what_the_logging_section_asks_for(fake_wandb, tmp_path):
    both = open_sinks(tmp_path, LoggingConfig(wandb_project="p"))
    assert [type(s).__name__ for s in both] == ["WandbSink", "TensorBoardSink"]
    for sink in both:
        sink.close()
    assert open_sinks(tmp_path, LoggingConfig(tensorboard=False)) == []
    assert len(fake_wandb.inits) == 1


def test_nothing_is_imported_when_no_project_is_set(no_wandb, tmp_path):
    """With wandb unimportable, an unset project must still work: proof that nothing imports it."""
    for project in (None, ""):
        check_wandb(project)
        assert open_sinks(tmp_path, wandb_only(project)) == []
    writer = MetricsWriter(tmp_path, "ppo", open_sinks(tmp_path, LoggingConfig(tensorboard=False)))
    writer.log(1, {"objective/kl": 0.0})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "objective/kl": 0.0}]
    assert not (tmp_path / "wandb").exists()


def test_a_project_without_the_package_is_a_config_error_before_any_work(no_wandb, tmp_path):
    assert not wandb_importable()
    with pytest.raises(ConfigError) as err:
        check_wandb("rlhf-test")
    assert str(err.value) == MISSING_PACKAGE
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        config_from_dict({"logging": {"wandb_project": "rlhf-test"}})  # Config.validate() checks it
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        open_sinks(tmp_path / "out", wandb_only("rlhf-test"))
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_check_looks_the_package_up_without_importing_it(monkeypatch):
    looked_up = []

    def find_spec(name, *args):
        looked_up.append(name)
        return None

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError, match="pip install wandb or unset it"):
        check_wandb("p")
    assert looked_up == ["wandb"] and "wandb" not in sys.modules


def test_check_passes_when_the_package_is_there(fake_wandb):
    check_wandb("p")
    assert fake_wandb.inits == []  # a check never starts a run


def test_run_name_is_the_output_directory_with_its_parent(tmp_path):
    assert run_name(tmp_path / "demo" / "ppo") == "demo/ppo"
    assert run_name(tmp_path.anchor) is None  # the root has no name; W&B then picks one


def test_the_run_config_reaches_wandb_without_secrets(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "marker-wandb-key-31c9d0")
    run_config = {
        "cluster": {"ray_address": "ray://alice:marker-pw-5e2a@head:10001"},
        "logging": {"wandb_project": "p", "note": "key marker-wandb-key-31c9d0 pasted by mistake"},
        "ppo": {"kl_coef": 0.1},
    }
    for sink in open_sinks(tmp_path, wandb_only("p"), run_config):
        sink.close()
    sent = repr(fake_wandb.inits[0]["config"])
    assert "marker-pw-5e2a" not in sent and "marker-wandb-key-31c9d0" not in sent
    assert fake_wandb.inits[0]["config"]["ppo"] == {"kl_coef": 0.1}  # the rest is untouched
    assert "<redacted>" in sent
