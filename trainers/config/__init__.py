"""Typed configuration: one dataclass per section, loaded from YAML plus dotted overrides.

    cfg = load_config("trainers/configs/tiny.yaml", ["ppo.kl_coef=0.05"])
    cfg.ppo.kl_coef  # 0.05

Errors are :class:`trainers.errors.ConfigError` (exit code 2, one line): an unknown key names the
closest valid key, a wrong type or out-of-range value names the key, the value and what is allowed.
The sections live in :mod:`~trainers.config.sections`, the whole run and its checks in
:mod:`~trainers.config.run`, loading and printing in :mod:`~trainers.config.loading`; this package
re-exports all three (it stays light: no torch, no Ray).
"""

from __future__ import annotations

from trainers.config.loading import (
    add_config_args,
    config_from_dict,
    dump_yaml,
    load_config,
    to_dict,
    tokenizer_dir,
)
from trainers.config.run import Config
from trainers.config.sections import (
    ClusterConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    RMConfig,
    RolloutConfig,
    SFTConfig,
    TrainStageConfig,
    opt,
)

__all__ = [
    "ClusterConfig",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "PPOConfig",
    "PretrainConfig",
    "RMConfig",
    "RewardConfig",
    "RolloutConfig",
    "SFTConfig",
    "TrainStageConfig",
    "add_config_args",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "opt",
    "to_dict",
    "tokenizer_dir",
]
