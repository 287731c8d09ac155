"""trainers/ppo/setup.py without Ray: validation before anything starts, and what each actor is given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster.resources import RoleRequest
from tests.conftest import TINY_CONFIG
from trainers.config import config_from_dict, load_config
from trainers.data.io import write_parquet
from trainers.data.tokenizer import train_tokenizer
from trainers.errors import ConfigError, DataError
from trainers.ppo import setup


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A data dir (tokenizer, prompts, pretraining text) and two fake model dirs (config + weights file)."""
    root = tmp_path_factory.mktemp("ppo_inputs")
    texts = [f"write a note about the {i} red foxes and the lazy dog" for i in range(200)]
    train_tokenizer(texts, root / "data" / "tokenizer", vocab_size=320)
    for kind in ("prompts", "pretrain"):
        (root / "data" / kind).mkdir()
    write_parquet(root / "data" / "prompts" / "train.parquet", "prompts", [{"prompt": t} for t in texts[:20]])
    write_parquet(root / "data" / "pretrain" / "train.parquet", "pretrain", [{"text": t} for t in texts])
    for name in ("sft", "rm"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        (root / name / "model.safetensors").write_bytes(b"")
    return {"root": root, "data": root / "data", "sft": root / "sft", "rm": root / "rm"}


def make_cfg(inputs, **ppo_over):
    raw = {
        "data": {"dir": str(inputs["data"])},
        "model": {"path": str(inputs["sft"]), "max_len": 64},
        "reward": {"path": str(inputs["rm"])},
        "rollout": {"max_new_tokens": 16},
        "ppo": {"prompts_per_iteration": 8, "mini_batch_size": 8, "micro_batch_size": 2, **ppo_over},
    }
    return config_from_dict(raw)


def test_validate_run_encodes_prompts_and_ptx(inputs, tmp_path):
    out, data = setup.validate_run(make_cfg(inputs, ptx_coef=1.0), tmp_path / "out")
    assert len(data.prompts) == 20 and data.prompts[0][0] == 1  # BOS first
    assert data.ptx and all(len(ids) <= 64 for ids in data.ptx)
    assert data.stop_ids == (2,)  # the tokenizer's </s>; the model dir's config.json names none
    assert not out.exists()  # validation writes nothing


def _model_dir(root: Path, generation: dict | None, config: dict) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


def test_validate_run_takes_the_stop_ids_of_the_policy_dir(inputs, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(inputs["sft"], sft)
    (sft / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6]}))
    cfg = make_cfg(inputs)
    cfg.model.path = str(sft)
    _, data = setup.validate_run(cfg, tmp_path / "out")
    assert data.stop_ids == (2, 6)
    assert setup.rollout_kwargs(cfg, "cpu", data.stop_ids)["eos_token_ids"] == [2, 6]  # what vLLM stops on


def test_validate_run_skips_ptx_when_off(inputs, tmp_path):
    _, data = setup.validate_run(make_cfg(inputs), tmp_path / "out")
    assert data.ptx == []


@pytest.mark.parametrize("key", ["model", "reward"])
def test_missing_model_dir_is_a_config_error_naming_the_key(inputs, tmp_path, key):
    cfg = make_cfg(inputs)
    getattr(cfg, key).path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=f"{key}.path"):
        setup.validate_run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompt_without_room_for_the_response_is_dropped_or_a_data_error(inputs, tmp_path, capsys):
    cfg = make_cfg(inputs)
    cfg.rollout.max_new_tokens = 60  # max_len 64 leaves 4 tokens for the prompt
    with pytest.raises(DataError, match=r"no prompts \(of 20\) fit"):  # data.overlong=drop: all dropped
        setup.validate_run(cfg, tmp_path / "out")
    assert (
        "20 of 20 rows longer than model.max_len=64 minus rollout.max_new_tokens=60"
        in capsys.readouterr().out
    )
    cfg.data.overlong = "error"
    with pytest.raises(DataError) as err:
        setup.validate_run(cfg, tmp_path / "out")
    assert "prompts/train.parquet:1:" in str(err.value) and "rollout.max_new_tokens=60" in str(err.value)


def test_role_specs_give_each_actor_its_model_and_batch_shape(inputs):
    cfg = make_cfg(inputs, policy_workers=2, critic_workers=1, policy_lr=3e-5, critic_lr=7e-5, ptx_coef=0.5)
    cfg.rollout.temperature = 0.7
    specs = setup.role_specs(cfg, "cpu")
    sft, rm = str(inputs["sft"].resolve()), str(inputs["rm"].resolve())
    assert (specs["policy"].model_path, specs["reference"].model_path) == (sft, sft)
    assert (specs["critic"].model_path, specs["reward"].model_path) == (rm, rm)
    assert specs["policy"].grad_accum == 2 and specs["critic"].grad_accum == 4  # 8 / (2 x workers)
    assert (specs["policy"].lr, specs["critic"].lr) == (3e-5, 7e-5)
    assert specs["policy"].ptx_coef == 0.5 and specs["critic"].clip_eps == cfg.ppo.value_clip_eps
    assert all(s.temperature == 0.7 and s.dtype == "fp32" for s in specs.values())  # item 3
    assert specs["policy"].tokenizer_path == str((inputs["data"] / "tokenizer").resolve())
    assert all(s.micro_batch_tokens == 0 for s in specs.values())
    cfg.ppo.micro_batch_tokens = 300  # the plan's count varies by step: DeepSpeed is told 1
    specs = setup.role_specs(cfg, "cpu")
    assert all(s.micro_batch_tokens == 300 for s in specs.values())
    assert specs["policy"].grad_accum == 1 and specs["critic"].grad_accum == 1


def test_rollout_kwargs_cpu_uses_a_fixed_kv_cache(inputs):
    cfg = make_cfg(inputs)
    cfg.rollout.kv_cache_mb = 96
    kwargs = setup.rollout_kwargs(cfg, "cpu", (2,))
    assert kwargs["dtype"] == "float32" and kwargs["max_model_len"] == 64
    assert kwargs["kv_cache_memory_bytes"] == 96 * 2**20
    assert not kwargs["enable_sleep_mode"]


def test_reward_model_with_another_tokenizer_is_rejected(inputs, tmp_path):
    other_rm = tmp_path / "rm"
    shutil.copytree(inputs["rm"], other_rm)
    train_tokenizer(
        [f"entirely different words {i} zebra quartz" for i in range(200)], other_rm, vocab_size=300
    )
    cfg = make_cfg(inputs)
    cfg.reward.path = str(other_rm)
    with pytest.raises(ConfigError, match="docs/ppo_details.md item 7"):
        setup.validate_run(cfg, tmp_path / "out")
    train_tokenizer(
        [f"write a note about the {i} red foxes and the lazy dog" for i in range(200)],
        other_rm,
        vocab_size=320,
    )
    setup.validate_run(cfg, tmp_path / "out")  # the same tokenizer saved again is accepted


def test_role_requests_and_bundles_follow_the_worker_counts(inputs):
    cfg = make_cfg(inputs, policy_workers=2, critic_workers=1, reference_workers=1, reward_workers=3)
    cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size = 2, 4
    assert setup.role_requests(cfg) == {
        "policy": RoleRequest(2),
        "critic": RoleRequest(1),
        "reference": RoleRequest(1),
        "reward": RoleRequest(3),
        "rollout": RoleRequest(2, gpus_per_rank=4),
    }
    cfg.cluster.cpus_per_actor = 0.5
    cpu = setup.ppo_bundles(cfg, gpu=False)
    assert {role: len(b) for role, b in cpu.items()} == {
        "policy": 2,
        "critic": 1,
        "reference": 1,
        "reward": 3,
        "rollout": 2,
    }
    assert all(b == {"CPU": 0.5} for bundles in cpu.values() for b in bundles)
    assert setup.ppo_bundles(cfg, gpu=True)["rollout"] == [{"GPU": 4.0, "CPU": 0.5}] * 2


# --- reward sources and critic-free roles (docs/design.md, issue 15) ----------------------------------


def reward_cfg(inputs, reward: dict, **ppo_over):
    """A config with only the given ``reward.*`` keys (no reward.path unless given)."""
    raw = {
        "data": {"dir": str(inputs["data"])},
        "model": {"path": str(inputs["sft"]), "max_len": 64},
        "reward": reward,
        "rollout": {"max_new_tokens": 16},
        "ppo": {"prompts_per_iteration": 8, "mini_batch_size": 8, "micro_batch_size": 2, **ppo_over},
    }
    return config_from_dict(raw)


GRPO = {"advantage": "grpo", "samples_per_prompt": 2}
GOLD = "trainers.data.gold:reward"


@pytest.mark.parametrize(
    "reward, ppo, match",
    [
        ({}, GRPO, r"PPO needs a reward: set reward.path, reward.function or reward.url"),
        ({"function": GOLD}, {}, r"ppo.advantage=gae trains a critic that starts from the reward model"),
        (
            {"path": "RM", "weights": {"url": 0.5}},
            {},
            r"reward.weights names 'url' but reward.url is not set",
        ),
        ({"function": GOLD, "weights": {"rm": 1.0}}, GRPO, r"names 'rm' but reward.path is not set"),
        (
            {"function": "no_such_module_xyz:score"},
            GRPO,
            r"reward.function='no_such_module_xyz:score': importing no_such_module_xyz failed",
        ),
        (
            {"function": "trainers.data.gold:QUANTUM"},
            GRPO,
            r"reward.function='trainers.data.gold:QUANTUM': QUANTUM is a float, not a callable",
        ),
        ({"function": "trainers.data.gold"}, GRPO, r"expected 'package.module:function'"),
        (
            {"url": "http://127.0.0.1:9/", "url_timeout_s": 2},
            GRPO,
            r"reward.url='http://127.0.0.1:9/' is unreachable",
        ),
    ],
)
def test_check_reward_sources_refuses_in_one_line(inputs, reward, ppo, match):
    reward = {k: str(inputs["rm"]) if v == "RM" else v for k, v in reward.items()}
    cfg = reward_cfg(inputs, reward, **ppo)
    with pytest.raises(ConfigError, match=match) as err:
        setup.check_reward_sources(cfg)
    assert "\n" not in str(err.value)


def test_check_reward_sources_accepts_each_source_alone_and_combined(inputs):
    setup.check_reward_sources(make_cfg(inputs))  # the RM with GAE (today's run)
    setup.check_reward_sources(reward_cfg(inputs, {"function": GOLD}, **GRPO))
    both = reward_cfg(inputs, {"path": str(inputs["rm"]), "function": GOLD, "weights": {"function": 0.5}})
    setup.check_reward_sources(both)  # gae with the RM and a function, weighted


def test_a_critic_free_run_with_a_function_asks_for_no_critic_and_no_reward_model(inputs):
    cfg = reward_cfg(inputs, {"function": GOLD, "function_workers": 3}, **GRPO)
    assert setup.role_requests(cfg) == {
        "policy": RoleRequest(2),
        "reference": RoleRequest(1),
        "reward_function": RoleRequest(3, gpus_per_rank=0),
        "rollout": RoleRequest(1, gpus_per_rank=1),
    }
    specs = setup.role_specs(cfg, "cpu")
    assert set(specs) == {"policy", "reference"}
    gpu = setup.ppo_bundles(cfg, gpu=True)
    assert gpu["reward_function"] == [{"CPU": 1.0}] * 3  # CPU-only actors, no GPU share
    assert gpu["policy"] == [{"GPU": 1.0, "CPU": 1.0}] * 2


def test_role_requests_drop_the_critic_for_critic_free_and_the_rm_without_reward_path(inputs):
    rm = make_cfg(inputs, advantage="rloo", samples_per_prompt=2)
    assert set(setup.role_requests(rm)) == {"policy", "reference", "reward", "rollout"}
    assert set(setup.role_specs(rm, "cpu")) == {"policy", "reference", "reward"}
    gae = make_cfg(inputs)
    assert set(setup.role_requests(gae)) == {"policy", "critic", "reference", "reward", "rollout"}
    url = reward_cfg(inputs, {"url": "http://127.0.0.1:9/"}, advantage="reinforce_pp")
    assert set(setup.role_requests(url)) == {"policy", "reference", "rollout"}  # the endpoint is no actor


def test_role_specs_carry_the_policy_loss_settings(inputs):
    cfg = make_cfg(
        inputs, clip_eps_high=0.28, kl_loss_coef=0.01, kl_loss_estimator="k2", loss_agg="seq_mean_token_mean"
    )
    policy = setup.role_specs(cfg, "cpu")["policy"]
    assert (policy.clip_eps, policy.clip_eps_high) == (0.2, 0.28)
    assert (policy.kl_loss_coef, policy.kl_loss_estimator, policy.loss_agg) == (
        0.01,
        "k2",
        "seq_mean_token_mean",
    )


def test_validate_run_reads_held_out_prompts_and_the_records_only_with_eval_every(inputs, tmp_path):
    write_parquet(
        inputs["data"] / "prompts" / "valid.parquet",
        "prompts",
        [{"prompt": f"a held out note about {i} foxes"} for i in range(5)],
    )
    try:
        cfg = make_cfg(inputs, eval_every=2, eval_prompts=3)
        _, data = setup.validate_run(cfg, tmp_path / "out")
        assert len(data.eval_prompts) == 3 and len(data.eval_records) == 3
        assert data.eval_records[0]["prompt"] == "a held out note about 0 foxes"
        assert len(data.records) == len(data.prompts) == 20 and "prompt" in data.records[0]
        assert data.tokenizer is not None  # the driver decodes responses for text sources with it
        _, off = setup.validate_run(make_cfg(inputs), tmp_path / "out")
        assert off.eval_prompts == [] and off.eval_records == []
    finally:
        (inputs["data"] / "prompts" / "valid.parquet").unlink()


def test_objective_line_says_estimator_kl_placement_sources_and_ptx():
    from trainers.ppo.setup import objective_line

    ppo_ptx = load_config(TINY_CONFIG, ["reward.path=/rm"])
    assert (
        objective_line(ppo_ptx)
        == "advantage gae (with a critic), KL in the reward x0.1, reward rm x1, ptx x0.5"
    )
    grpo = load_config(
        TINY_CONFIG,
        [
            "reward.path=/rm",
            "reward.function=trainers.data.gold:reward",
            "reward.weights={rm: 0.5}",
            "ppo.advantage=grpo",
            "ppo.samples_per_prompt=4",
            "ppo.kl_coef=0",
            "ppo.kl_loss_coef=0.05",
            "ppo.ptx_coef=0",
        ],
    )
    assert (
        objective_line(grpo) == "advantage grpo (no critic), KL as a loss x0.05, reward rm x0.5 + function x1"
    )


def test_role_specs_carry_the_memory_settings(inputs):
    """docs/design.md "Memory (issue 17)": checkpointing and optimizer offload for the trained roles,
    parameter offload and the log-prob chunk for every DeepSpeed role."""
    cfg = make_cfg(inputs, offload_params=True, offload_optimizer=True, logprob_chunk_size=64)
    cfg.model.gradient_checkpointing = True
    specs = setup.role_specs(cfg, "cpu")
    for role in ("policy", "critic"):
        assert specs[role].gradient_checkpointing and specs[role].offload_optimizer, role
    assert all(s.offload_params and s.logprob_chunk_size == 64 for s in specs.values())
    assert not hasattr(specs["reference"], "offload_optimizer")
    default = setup.role_specs(make_cfg(inputs), "cpu")
    assert all(s.logprob_chunk_size == 1024 and not s.offload_params for s in default.values())
    assert not default["policy"].gradient_checkpointing and not default["policy"].offload_optimizer
