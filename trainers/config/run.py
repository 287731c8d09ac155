"""The whole run's config, :class:`Config` (one field per section of :mod:`trainers.config.sections`), and
:meth:`Config.validate`, the only place that checks derived batch arithmetic and cross-field rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.config.sections import (
    GROUP_ADVANTAGES,
    PPO_ROLES,
    RESERVED_RESOURCES,
    REWARD_SOURCES,
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
)
from trainers.config.transport import choose_transport
from trainers.errors import ConfigError
from trainers.runs.sinks import check_wandb


@dataclass
class Config:
    """The whole run: one field per section."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        """Check derived batch arithmetic and cross-field rules; the one place that does so."""
        for name in ("pretrain", "sft", "rm"):
            st: TrainStageConfig = getattr(self, name)
            per_step = st.micro_batch_size * st.num_workers
            if st.global_batch_size % per_step:
                raise ConfigError(
                    f"{name}.global_batch_size={st.global_batch_size} is not a multiple of "
                    f"{name}.micro_batch_size x {name}.num_workers = {per_step}"
                )
        p = self.ppo
        rollout_batch = p.prompts_per_iteration * p.samples_per_prompt
        if rollout_batch % p.mini_batch_size:
            raise ConfigError(
                f"ppo.prompts_per_iteration x ppo.samples_per_prompt = {rollout_batch} is not a multiple of "
                f"ppo.mini_batch_size={p.mini_batch_size}"
            )
        trained = [("policy", p.policy_workers)] + [("critic", p.critic_workers)] * (p.advantage == "gae")
        for role, workers in trained:  # critic-free runs have no critic to split batches for
            if p.micro_batch_tokens > 0:  # micro-batches by tokens: only the ranks must split evenly
                if p.mini_batch_size % workers:
                    raise ConfigError(
                        f"ppo.mini_batch_size={p.mini_batch_size} does not split evenly over ppo.{role}_workers={workers}"
                    )
                continue
            per_step = p.micro_batch_size * workers
            if p.mini_batch_size % per_step:
                raise ConfigError(
                    f"ppo.mini_batch_size={p.mini_batch_size} is not a multiple of ppo.micro_batch_size x "
                    f"ppo.{role}_workers = {per_step}"
                )
        if rollout_batch % p.policy_workers:
            raise ConfigError(
                f"rollout batch {rollout_batch} does not split evenly over ppo.policy_workers={p.policy_workers}"
            )
        if self.rollout.top_p != 1.0 or self.rollout.top_k != -1:
            raise ConfigError(
                "rollout.top_p must be 1.0 and rollout.top_k -1 for PPO: log-probs must match the sampler"
            )
        if self.cluster.placement == "colocated" and self.rollout.tensor_parallel_size != 1:
            raise ConfigError(
                f"cluster.placement=colocated needs rollout.tensor_parallel_size=1, got "
                f"{self.rollout.tensor_parallel_size}: each engine shares one GPU with the training ranks"
            )
        self._validate_weight_sync()
        if self.rollout.max_new_tokens >= self.model.max_len:
            raise ConfigError(
                f"rollout.max_new_tokens={self.rollout.max_new_tokens} must be below model.max_len={self.model.max_len}"
            )
        self._validate_estimator()
        self._validate_offload()
        self._validate_rewards()
        self._validate_role_resources()
        check_wandb(self.logging.wandb_project)  # finds the package without importing it
        return self

    def _validate_weight_sync(self) -> None:
        """rollout.weight_sync against the placement (and the device, when it is not 'auto')."""
        c = self.cluster
        devices = ("cpu", "cuda") if c.device == "auto" else (c.device,)
        errors = []
        for device in devices:
            try:
                choose_transport(device, c.placement, self.rollout.weight_sync)
            except ValueError as err:
                errors.append(str(err))
        if len(errors) == len(devices):  # fits no device this run could resolve to
            raise ConfigError(errors[0])

    def _validate_estimator(self) -> None:
        """Rules of ``ppo.advantage`` and dynamic sampling (docs/ppo_details.md item 31)."""
        p = self.ppo
        if p.samples_per_prompt < 2:
            if p.advantage in GROUP_ADVANTAGES:
                raise ConfigError(
                    f"ppo.advantage={p.advantage} compares a prompt's samples: it needs ppo.samples_per_prompt >= 2, "
                    f"got {p.samples_per_prompt}"
                )
            if p.dynamic_sampling:
                raise ConfigError(
                    "ppo.dynamic_sampling drops prompts whose samples all score the same: it needs "
                    f"ppo.samples_per_prompt >= 2, got {p.samples_per_prompt}"
                )
        if p.clip_eps_high is not None and p.clip_eps_high < p.clip_eps:
            raise ConfigError(
                f"ppo.clip_eps_high={p.clip_eps_high:g} is below ppo.clip_eps={p.clip_eps:g} (clip-higher widens the upper side)"
            )

    def _validate_offload(self) -> None:
        """DeepSpeed silently ignores offload its ZeRO stage cannot do (docs/design.md, "Memory (issue 17)")."""
        p = self.ppo
        if p.offload_params and p.zero_stage != 3:
            raise ConfigError(
                f"ppo.offload_params needs ppo.zero_stage=3 (parameter partitions), got {p.zero_stage}"
            )
        if p.offload_optimizer and p.zero_stage == 0:
            raise ConfigError("ppo.offload_optimizer needs ppo.zero_stage 1, 2 or 3 (ZeRO-Offload), got 0")
        if p.micro_batch_tokens > 0 and p.offload_optimizer and p.zero_stage in (1, 2):
            raise ConfigError(
                f"ppo.micro_batch_tokens with ppo.offload_optimizer needs ppo.zero_stage 3, got {p.zero_stage}: "
                "ZeRO 1/2's offload accumulates by the configured micro-batch count, which a token budget varies"
            )

    def _validate_role_resources(self) -> None:
        """``cluster.role_resources`` names PPO roles (or '*') and custom resources with positive amounts:
        CPUs and GPUs come from ``cluster.cpus_per_actor`` and each role's own needs."""
        for role, resources in self.cluster.role_resources.items():
            if role not in (*PPO_ROLES, "*"):
                raise ConfigError(
                    f"cluster.role_resources names '{role}', not a PPO role (one of {', '.join(PPO_ROLES)}, or '*')"
                )
            for name, amount in resources.items():
                if name in RESERVED_RESOURCES:
                    raise ConfigError(
                        f"cluster.role_resources.{role} asks for '{name}': name custom resources only "
                        "(CPUs come from cluster.cpus_per_actor, GPUs from the role's own needs)"
                    )
                if amount <= 0:
                    raise ConfigError(f"cluster.role_resources.{role}.{name} must be > 0, got {amount:g}")

    def _validate_rewards(self) -> None:
        """``reward.weights`` names known sources (that they are configured is PPO's check,
        ``trainers.ppo.setup``: other stages run without them); the overlong buffer fits the response length."""
        r = self.reward
        for name in r.weights:
            if name not in REWARD_SOURCES:
                raise ConfigError(
                    f"reward.weights names '{name}', not a reward source (one of {', '.join(REWARD_SOURCES)})"
                )
        if r.overlong_buffer > self.rollout.max_new_tokens:
            raise ConfigError(
                f"reward.overlong_buffer={r.overlong_buffer} is longer than rollout.max_new_tokens={self.rollout.max_new_tokens}"
            )
