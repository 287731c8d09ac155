"""The running actor groups of a PPO run: their classes, start-up in placement groups, shut-down, and the
check that the cluster can ever hold them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.actor import ActorHandle

from actors.critic import CriticWorker
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from actors.reward import RewardWorker
from actors.reward_function import FunctionRewardPool
from actors.rollout import RolloutEngine
from cluster.actor_group import ActorGroup
from cluster.connect import connect
from cluster.faults import fault_env
from cluster.placement import RolePlacement, place_roles, release
from cluster.resources import check_feasible, detect_resources, use_gpu
from trainers.config import Config
from trainers.ppo.schedule import derived_seed
from trainers.ppo.setup import ppo_bundles, role_specs, rollout_kwargs
from trainers.runtime.dist import backend_for


@dataclass
class Roles:
    """The running actor groups of one PPO run and their placement groups."""

    policy: ActorGroup
    """:class:`actors.policy.PolicyWorker` ranks (one ZeRO world)."""
    reference: ActorGroup
    """:class:`actors.reference.ReferenceWorker` ranks."""
    rollout: ActorGroup
    """:class:`actors.rollout.RolloutEngine` actors (vLLM engines; not a torch.distributed world)."""
    placements: dict[str, RolePlacement]
    """Each role's placement group share (:func:`cluster.placement.place_roles`)."""
    critic: ActorGroup | None = None
    """:class:`actors.critic.CriticWorker` ranks; None in critic-free runs (``ppo.advantage`` not ``gae``)."""
    reward: ActorGroup | None = None
    """:class:`actors.reward.RewardWorker` ranks; None without ``reward.path``."""
    reward_function: FunctionRewardPool | None = None
    """The ``reward.function`` workers (CPU actors); None without a reward function."""
    colocated_gpu: bool = False
    max_engine_restarts: int = 0
    """``ppo.max_engine_restarts``: lost engines this driver recovers before it stops the run."""
    engine_restarts: int = 0
    """Lost engines recovered so far by this driver process (all engines together)."""

    def engines(self) -> list[ActorHandle]:
        """The rollout engines' actor handles."""
        return list(self.rollout.actors)

    def training_actors(self) -> dict[tuple[str, int], ActorHandle]:
        """``(role, rank) -> handle`` of every DeepSpeed actor: ranks of torch.distributed worlds, which
        cannot be restarted one by one (a lost one stops the run)."""
        return {
            (role, rank): a
            for role, group in self.training_groups().items()
            for rank, a in enumerate(group.actors)
        }

    def function_actors(self) -> dict[tuple[str, int], ActorHandle]:
        """``("reward_function", rank) -> handle`` of the reward-function workers: not restarted either (a
        lost one stops the run, resumable)."""
        pool = self.reward_function
        return {} if pool is None else {("reward_function", r): a for r, a in enumerate(pool.actors)}

    def training_groups(self) -> dict[str, ActorGroup]:
        """The DeepSpeed groups this run has (critic and reward only when used), in start-up order."""
        groups = {
            "policy": self.policy,
            "critic": self.critic,
            "reference": self.reference,
            "reward": self.reward,
        }
        return {role: group for role, group in groups.items() if group is not None}

    def shutdown(self) -> None:
        """Kill every actor, then free the placement groups."""
        if self.reward_function is not None:
            self.reward_function.shutdown()
        for group in (self.rollout, *self.training_groups().values()):
            group.kill()
        release(self.placements)


def push_policy_weights(roles: Roles) -> dict:
    """The gathered policy weights into every engine (collective over the policy ranks); rank 0's stats.

    The engine restarts so far go with it: after one, the broadcast transport forms its group anew (a
    restarted engine is no member); a line says when a push formed a group.
    """
    engines, epoch = roles.engines(), roles.engine_restarts
    stats = ray.get(roles.policy.map(lambda a, _r: a.sync_weights.remote(engines, epoch)))[0]
    if stats.get("group_setup"):
        print(
            f"ppo: weight sync formed its {stats['transport']} group (setup {stats['group_setups']}, "
            f"{len(engines)} engines)",
            flush=True,
        )
    return stats


def role_classes(cfg: Config) -> dict[str, type]:
    """The DeepSpeed roles of this run and their actor classes, in start-up order: no critic in
    critic-free runs, no reward model without ``reward.path``."""
    classes = {
        "policy": PolicyWorker,
        "critic": CriticWorker,
        "reference": ReferenceWorker,
        "reward": RewardWorker,
    }
    if cfg.ppo.advantage != "gae":
        del classes["critic"]
    if cfg.reward.path is None:
        del classes["reward"]
    return classes


def start_roles(cfg: Config, device: str, run_name: str, stop_ids: Sequence[int]) -> Roles:
    """Place every role, start its actors, form the torch.distributed worlds, build the models.

    ``stop_ids``: the run's stop set, given to every vLLM engine (:func:`trainers.ppo.setup.rollout_kwargs`).

    The vLLM engines start first (the slowest to come up) and load in the background while the
    DeepSpeed ranks build (except on shared GPUs: colocated placement waits for the engines first);
    one ``ray.get`` waits for everything. A failed start kills what it started
    and frees the placement groups before re-raising.
    """
    gpu = device == "cuda"
    colocated = cfg.cluster.placement == "colocated"
    placements = place_roles(
        ppo_bundles(cfg, gpu),
        colocated=colocated,
        timeout_s=cfg.cluster.placement_timeout_s,
        name=run_name,
        cluster=detect_resources(cfg.cluster.autoscaling, cfg.cluster.autoscaler_config),
    )
    threads, specs = cfg.cluster.torch_threads, role_specs(cfg, device)
    # RLHF_FAULT_* (test fault injection, cluster/faults.py; empty otherwise) to every actor: Ray workers do
    # not see variables set after Ray started, and each actor consults its own environment.
    faults = fault_env()
    started: dict[str, ActorGroup] = {}
    started_pool: FunctionRewardPool | None = None
    try:
        started["rollout"] = ActorGroup(
            RolloutEngine,
            placements["rollout"],
            run_name=run_name,
            init_args=(str(Path(cfg.model.path).resolve()),),
            init_kwargs=rollout_kwargs(cfg, device, stop_ids),
            rank_kwargs=lambda rank: {"seed": derived_seed(cfg.ppo.seed, 10_000 + rank)},
            torch_threads=threads,
            env=faults,
            max_restarts=cfg.ppo.max_engine_restarts,
        )
        if gpu and colocated:
            # vLLM sizes its KV cache from the GPU's free memory while it starts, assuming no other process
            # changes its usage meanwhile; on a shared GPU the DeepSpeed ranks build only after that.
            ray.get([a.health.remote() for a in started["rollout"].actors])
        if cfg.reward.function is not None:
            started_pool = FunctionRewardPool(
                cfg.reward.function,
                cfg.reward.function_workers,
                options=[
                    placements["reward_function"].actor_options(r) for r in range(cfg.reward.function_workers)
                ],
                name_prefix=run_name,
            )
        classes = role_classes(cfg)
        for role, cls in classes.items():
            started[role] = ActorGroup(
                cls,
                placements[role],
                run_name=run_name,
                init_kwargs={"spec": specs[role]},
                torch_threads=threads,
                env=faults,
            )
        for role in classes:
            started[role].init_world(backend_for(device))
        ray.get([ref for role in classes for ref in started[role].map(lambda a, _r: a.build.remote())])
        ray.get([a.health.remote() for a in started["rollout"].actors])
    except BaseException:
        for group in started.values():  # leave no actors or reserved resources behind
            group.kill()
        if started_pool is not None:
            started_pool.shutdown()
        release(placements)
        raise
    return Roles(
        **started,
        reward_function=started_pool,
        placements=placements,
        colocated_gpu=gpu and colocated,
        max_engine_restarts=cfg.ppo.max_engine_restarts,
    )


def check_resources(cfg: Config) -> str:
    """Connect to Ray and fail with one line naming the role if the request can never be met;
    returns the device (``'cpu'``/``'cuda'``)."""
    connect(cfg.cluster.ray_address, cfg.cluster.num_cpus, cfg.cluster.torch_threads)
    resources = detect_resources(cfg.cluster.autoscaling, cfg.cluster.autoscaler_config)
    gpu = use_gpu(cfg.cluster.device, resources)
    check_feasible(ppo_bundles(cfg, gpu), resources, colocated=cfg.cluster.placement == "colocated")
    return "cuda" if gpu else "cpu"
