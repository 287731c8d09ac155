"""Config loading, overrides, and every error path of trainers/config.py."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from tests.conftest import REPO
from trainers.config import Config, config_from_dict, dump_yaml, load_config
from trainers.errors import ConfigError, UserError


def write(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.ppo.kl_coef == 0.02  # InstructGPT's beta
    assert cfg.ppo.lam == 0.95 and cfg.ppo.gamma == 1.0 and cfg.ppo.clip_eps == 0.2


def test_yaml_then_override_wins(tmp_path):
    p = write(tmp_path, "ppo:\n  kl_coef: 0.05\n  iterations: 3\nmodel:\n  path: /x\n")
    cfg = load_config(p, ["ppo.kl_coef=0.1", "model.dropout=0.2"])
    assert cfg.ppo.kl_coef == 0.1
    assert cfg.ppo.iterations == 3
    assert cfg.model.path == "/x"
    assert cfg.model.dropout == 0.2


def test_override_types_parse_like_yaml():
    cfg = config_from_dict(
        {}, ["ppo.adaptive_kl=true", "model.path=null", "rm.lr=3e-5", "model.tokenizer=tok"]
    )
    assert cfg.ppo.adaptive_kl is True
    assert cfg.model.path is None
    assert cfg.rm.lr == pytest.approx(3e-5)  # YAML 1.1 alone would read "3e-5" as a string
    assert load_config(None, ["sft.lr=1E-3"]).sft.lr == pytest.approx(1e-3)
    assert cfg.model.tokenizer == "tok"


def test_int_widens_to_float_but_not_back():
    assert config_from_dict({"ppo": {"kl_coef": 1}}).ppo.kl_coef == 1.0
    assert isinstance(config_from_dict({"ppo": {"kl_coef": 1}}).ppo.kl_coef, float)
    with pytest.raises(ConfigError, match=r"'ppo.iterations': expected int, got 2.5"):
        config_from_dict({"ppo": {"iterations": 2.5}})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="ppo.iterations"):
        config_from_dict({"ppo": {"iterations": True}})


def test_optional_string_accepts_none_and_str_rejects_number():
    assert config_from_dict({"model": {"path": None}}).model.path is None
    with pytest.raises(ConfigError, match=r"'model.path': expected str or null, got 5"):
        config_from_dict({"model": {"path": 5}})


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, ["ppo.kl_cof=0.1"])
    msg = str(err.value)
    assert "kl_cof" in msg and "did you mean 'ppo.kl_coef'" in msg
    assert "\n" not in msg


def test_unknown_key_in_yaml(tmp_path):
    p = write(tmp_path, "sft:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sft.epoch'; did you mean 'sft.epochs'\?"):
        load_config(p)


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown config section 'rollouts'; did you mean 'rollout'\?"):
        config_from_dict({"rollouts": {}})
    with pytest.raises(
        ConfigError, match=r"unknown config key 'rollouts.num_engines'; did you mean 'rollout.num_engines'"
    ):
        config_from_dict({}, ["rollouts.num_engines=2"])


def test_out_of_range_and_choices():
    with pytest.raises(ConfigError, match=r"'ppo.kl_coef': -1.0 is out of range \(must be >= 0\)"):
        config_from_dict({}, ["ppo.kl_coef=-1"])
    with pytest.raises(ConfigError, match=r"'rollout.top_p': 1.5 is out of range \(must be <= 1\)"):
        config_from_dict({}, ["rollout.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"'ppo.clip_eps': 0.0 is out of range \(must be > 0\)"):
        config_from_dict({}, ["ppo.clip_eps=0"])
    with pytest.raises(ConfigError, match=r"'ppo.kl_estimator': 'k4' is not one of 'k1', 'k2', 'k3'"):
        config_from_dict({}, ["ppo.kl_estimator=k4"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        config_from_dict({}, ["ppo.kl_coef"])
    with pytest.raises(ConfigError, match="must be section.key"):
        config_from_dict({}, ["kl_coef=0.1"])
    with pytest.raises(ConfigError, match="must be section.key"):
        config_from_dict({}, ["ppo.kl.coef=0.1"])


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config section 'ppo' must be a mapping"):
        load_config(write(tmp_path, "ppo: 3\n"))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+' is not valid YAML"):
        load_config(write(tmp_path, "ppo:\n  kl_coef: [1\n"))
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    assert load_config(write(tmp_path, "")).ppo.kl_coef == 0.02  # empty file = defaults


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["sft.global_batch_size=30", "sft.micro_batch_size=8", "sft.num_workers=2"],
            "sft.global_batch_size=30 is not a multiple",
        ),
        (
            ["ppo.prompts_per_iteration=10", "ppo.mini_batch_size=4"],
            r"= 10 is not a multiple of ppo.mini_batch_size=4",
        ),
        (
            ["ppo.mini_batch_size=16", "ppo.micro_batch_size=3"],
            "ppo.mini_batch_size=16 is not a multiple of ppo.micro_batch_size x ppo.policy_workers",
        ),
        (["ppo.critic_workers=3"], "ppo.critic_workers = 24"),
        (
            ["ppo.micro_batch_tokens=512", "ppo.critic_workers=3"],
            "ppo.mini_batch_size=16 does not split evenly over ppo.critic_workers=3",
        ),
        (
            ["ppo.micro_batch_tokens=512", "ppo.offload_optimizer=true", "ppo.zero_stage=2"],
            "ppo.micro_batch_tokens with ppo.offload_optimizer needs ppo.zero_stage 3, got 2",
        ),
        (["rollout.top_k=5"], "top_k -1 for PPO"),
        (["rollout.max_new_tokens=300", "model.max_len=256"], "must be below model.max_len"),
    ],
)
def test_validate_batch_arithmetic(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({}, overrides)


def test_micro_batch_tokens_replaces_the_micro_batch_size_arithmetic():
    """With a token budget the micro-batch count varies by step: only the ranks must split a minibatch."""
    cfg = config_from_dict({}, ["ppo.micro_batch_tokens=512", "ppo.micro_batch_size=3"])
    assert cfg.ppo.micro_batch_tokens == 512
    with pytest.raises(ConfigError, match="ppo.micro_batch_tokens"):
        config_from_dict({}, ["ppo.micro_batch_tokens=-1"])


def test_errors_are_user_errors_with_one_line():
    with pytest.raises(UserError) as err:
        config_from_dict({}, ["ppo.kl_coef=abc"])
    assert err.value.lines == [str(err.value)]
    assert "\n" not in str(err.value)


def test_every_field_is_documented():
    for f in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[f.name]
        assert section.__doc__, f.name
        for sf in dataclasses.fields(section):
            assert sf.metadata.get("doc"), f"{f.name}.{sf.name} has no documentation"


def test_dump_roundtrips(tmp_path):
    cfg = config_from_dict({}, ["ppo.kl_coef=0.1", "model.path=/m"])
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg
    documented = dump_yaml(cfg, with_docs=True)
    assert "  kl_coef: 0.1  # KL penalty coefficient" in documented
    assert yaml.safe_load(documented)["ppo"]["kl_coef"] == 0.1  # comments keep it valid YAML


def test_shipped_presets_load():
    configs = sorted((REPO / "trainers" / "configs").glob("*.yaml"))
    assert configs, "no shipped config presets"
    for p in configs:
        assert isinstance(load_config(p), Config), p


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["ppo.advantage=grpo"],
            r"ppo.advantage=grpo compares a prompt's samples: .*samples_per_prompt >= 2, got 1",
        ),
        (["ppo.advantage=rloo", "ppo.samples_per_prompt=1"], "ppo.advantage=rloo compares"),
        (["ppo.advantage=reinforce_pp_baseline"], "ppo.advantage=reinforce_pp_baseline compares"),
        (["ppo.dynamic_sampling=true"], r"ppo.dynamic_sampling .* needs ppo.samples_per_prompt >= 2, got 1"),
        (["ppo.clip_eps_high=0.1"], r"ppo.clip_eps_high=0.1 is below ppo.clip_eps=0.2"),
        (
            ["reward.weights={judge: 1}"],
            r"reward.weights names 'judge', not a reward source \(one of rm, function, url\)",
        ),
        (
            ["reward.overlong_buffer=49"],
            r"reward.overlong_buffer=49 is longer than rollout.max_new_tokens=48",
        ),
        (["ppo.advantage=ppo"], r"'ppo.advantage': 'ppo' is not one of 'gae', 'grpo'"),
        (["ppo.loss_agg=sum"], r"'ppo.loss_agg': 'sum' is not one of"),
        (["reward.weights=3"], r"'reward.weights': expected dict, got 3"),
        (["reward.weights={rm: high}"], r"'reward.weights.rm': expected float, got 'high'"),
    ],
)
def test_validate_issue_15_rules_in_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        config_from_dict({}, overrides)
    assert "\n" not in str(err.value)


def test_critic_free_and_dapo_settings_that_fit_validate():
    cfg = config_from_dict(
        {},
        [
            "ppo.advantage=grpo",
            "ppo.samples_per_prompt=4",
            "ppo.dynamic_sampling=true",
            "ppo.clip_eps_high=0.28",
            "reward.overlong_buffer=48",  # the whole response length is allowed
        ],
    )
    assert (cfg.ppo.advantage, cfg.ppo.clip_eps_high, cfg.reward.overlong_buffer) == ("grpo", 0.28, 48)
    assert config_from_dict({}, ["ppo.advantage=reinforce_pp"]).ppo.advantage == "reinforce_pp"  # no groups
    assert config_from_dict({}, ["ppo.clip_eps_high=0.2"]).ppo.clip_eps_high == 0.2  # equal is symmetric


def test_reward_weights_from_a_dotted_override_and_yaml(tmp_path):
    cfg = config_from_dict({}, ["reward.weights={rm: 0.5, function: 2}"])
    assert cfg.reward.weights == {"rm": 0.5, "function": 2.0}
    assert isinstance(cfg.reward.weights["function"], float)  # ints widen like every float key
    assert load_config(write(tmp_path, "reward:\n  weights:\n    url: 0.25\n")).reward.weights == {
        "url": 0.25
    }
    assert load_config(write(tmp_path, dump_yaml(cfg, with_docs=True), "d.yaml")) == cfg  # round-trips
    first, second = config_from_dict({}), config_from_dict({})
    first.reward.weights["rm"] = 3.0
    assert second.reward.weights == {}  # the default is a fresh dict per config, not a shared one


def test_reward_sources_in_their_fixed_order():
    cfg = config_from_dict({"reward": {"url": "http://h/", "path": "/rm", "function": "m:f"}})
    assert cfg.reward.sources() == ["rm", "function", "url"]
    assert config_from_dict({}).reward.sources() == []


def test_critic_free_runs_do_not_check_the_unused_critic_workers():
    """No critic starts without GAE (trainers/ppo/setup.py role_requests), so ppo.critic_workers must not
    make a grpo run's batch arithmetic fail; with GAE the same value still does."""
    over = ["ppo.samples_per_prompt=2", "ppo.critic_workers=3"]  # 16 is not a multiple of 8 x 3
    assert config_from_dict({}, ["ppo.advantage=grpo", *over]).ppo.critic_workers == 3
    with pytest.raises(ConfigError, match="ppo.critic_workers = 24"):
        config_from_dict({}, over)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.offload_params=true", "ppo.zero_stage=2"], "ppo.offload_params needs ppo.zero_stage=3"),
        (
            ["ppo.offload_optimizer=true", "ppo.zero_stage=0"],
            "ppo.offload_optimizer needs ppo.zero_stage 1, 2 or 3",
        ),
    ],
)
def test_offload_the_zero_stage_cannot_do_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    ok = load_config(None, ["ppo.offload_params=true", "ppo.offload_optimizer=true", "ppo.zero_stage=3"])
    assert ok.ppo.offload_params and ok.ppo.offload_optimizer
    assert load_config(None, ["ppo.offload_optimizer=true", "ppo.zero_stage=1"]).ppo.offload_optimizer
