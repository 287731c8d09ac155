"""N Ray actors of one role, placed by a placement group and joined into one torch.distributed world.

    bundles = role_bundles({"policy": RoleRequest(ranks=2)}, gpu=False)      # cluster/resources.py
    placements = place_roles(bundles, colocated=False, timeout_s=600)        # cluster/placement.py
    policy = ActorGroup(PolicyWorker, placements["policy"], run_name="ppo", backend="gloo",
                        init_kwargs={"spec": spec})                          # only what the role needs
    refs = policy.map(lambda actor, rank: actor.logprobs.remote(shards[rank]))   # fan out
    logprobs = unshard(ray.get(refs), shards)                     # one ray.get per phase (data.sharding)

Fan-out goes through typed lambdas over the actor handles (``map``), never through
method names as strings. Actors are named ``{run_name}-{role}-{rank}`` so the dashboard and
``ray.get_actor`` find them. Every actor gets ``OMP_NUM_THREADS`` (and friends) = ``torch_threads``.

Actor classes that need the world subclass :class:`DistributedWorker`; rank 0 reports its IP and a
free port, and every rank joins ``tcp://ip:port`` with gloo (CPU) or NCCL (GPU).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.actor import ActorClass, ActorHandle

from cluster.connect import runtime_env_vars
from cluster.placement import RolePlacement


class DistributedWorker:
    """Mixin for a role's actor class: joining the role's torch.distributed world."""

    rank: int = 0
    world_size: int = 1

    def get_master_addr_port(self) -> tuple[str, int]:
        """This node's IP and a port free right now (rank 0 hosts the rendezvous there)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup_distributed(
        self, master_addr: str, master_port: int, world_size: int, rank: int, backend: str
    ) -> None:
        """Join the world; also export the torchrun-style variables DeepSpeed reads.

        LOCAL_RANK is 0: Ray gives each GPU actor its own ``CUDA_VISIBLE_DEVICES``.
        """
        import torch.distributed as dist

        os.environ.update(
            {
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
            }
        )
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            world_size=world_size,
            rank=rank,
        )
        self.rank, self.world_size = rank, world_size


class ActorGroup:
    """The ranks of one role: Ray actors pinned to their bundles, optionally one torch.distributed world."""

    def __init__(
        self,
        actor_cls: type | ActorClass,
        placement: RolePlacement,
        *,
        run_name: str = "rlhf",
        init_args: Sequence[Any] = (),
        init_kwargs: Mapping[str, Any] | None = None,
        rank_kwargs: Callable[[int], Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        torch_threads: int = 1,
        backend: str | None = None,
        max_restarts: int = 0,
    ):
        """Start ``placement.num_ranks`` actors of ``actor_cls`` (a plain class or a ``ray.remote`` one).

        ``rank_kwargs(rank)`` adds per-rank constructor arguments (e.g. a seed per rollout engine).
        ``backend`` ('gloo'/'nccl') forms the torch.distributed world; None leaves the ranks apart.
        ``max_restarts``: times Ray restarts a lost actor (same constructor arguments, same bundle). Tasks
        are never retried by Ray (``max_task_retries=0``): a call in flight fails and the caller decides.
        Only for actors outside a torch.distributed world -- a restarted rank could not rejoin it.
        """
        if max_restarts and backend is not None:
            raise ValueError("ranks of a torch.distributed world cannot be restarted one by one")
        self.role = placement.role
        remote_cls = actor_cls if isinstance(actor_cls, ActorClass) else ray.remote(actor_cls)
        env_vars = {**runtime_env_vars(torch_threads), **(env or {})}
        self.names = [f"{run_name}-{self.role}-{rank}" for rank in range(placement.num_ranks)]
        self.actors: list[ActorHandle] = [
            remote_cls.options(
                name=name,
                runtime_env={"env_vars": env_vars},
                max_restarts=max_restarts,
                max_task_retries=0,
                **placement.actor_options(rank),
            ).remote(*init_args, **(init_kwargs or {}), **(rank_kwargs(rank) if rank_kwargs else {}))
            for rank, name in enumerate(self.names)
        ]
        if backend is not None:
            self.init_world(backend)

    def __len__(self) -> int:
        return len(self.actors)

    def init_world(self, backend: str) -> None:
        """Form one torch.distributed world over the ranks (actors must subclass DistributedWorker)."""
        addr, port = ray.get(self.actors[0].get_master_addr_port.remote())
        n = len(self.actors)
        ray.get(
            [a.setup_distributed.remote(addr, port, n, rank, backend) for rank, a in enumerate(self.actors)]
        )

    def map(self, fn: Callable[[ActorHandle, int], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """``fn(actor, rank)`` for every rank, e.g. ``lambda a, r: a.train.remote(batch)``; refs in rank order."""
        return [fn(actor, rank) for rank, actor in enumerate(self.actors)]

    def rank_of(self, actor_id: str | None) -> int | None:
        """The rank whose actor has this hex id (``cluster.liveness.lost_actor_id``), else None."""
        from cluster.liveness import actor_id_of

        ids = [actor_id_of(a) for a in self.actors]
        return ids.index(actor_id) if actor_id in ids else None

    def kill(self) -> None:
        """Stop every actor of the group now, for good (no restart)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
