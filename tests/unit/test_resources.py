"""Role -> bundle mapping and feasibility checks (no Ray needed)."""

from __future__ import annotations

import pytest

from cluster.resources import (
    ClusterResources,
    RoleRequest,
    check_feasible,
    colocated_bundles,
    role_bundles,
    use_gpu,
)
from trainers.config import config_from_dict
from trainers.errors import ConfigError, UserError


def make_roles(engines=2, tp=1, policy=2, critic=1) -> dict[str, RoleRequest]:
    """The five PPO roles as the PPO driver asks for them (trainers.ppo.setup.role_requests)."""
    return {
        "policy": RoleRequest(policy),
        "critic": RoleRequest(critic),
        "reference": RoleRequest(1),
        "reward": RoleRequest(1),
        "rollout": RoleRequest(engines, gpus_per_rank=tp),
    }


def bundles_of(placement="dedicated", engines=2, tp=1, cpus=1.0, policy=2, critic=1, gpu=True):
    roles = make_roles(engines, tp, policy, critic)
    return role_bundles(roles, gpu=gpu, placement=placement, cpus_per_actor=cpus)


def gpu_cluster(gpus_per_node=8, nodes=1, cpus=32, max_total=None, extra_shapes=()):
    shape = {"CPU": float(cpus), "GPU": float(gpus_per_node)}
    total = {"CPU": float(cpus * nodes), "GPU": float(gpus_per_node * nodes)}
    return ClusterResources(
        total=total, node_shapes=[dict(shape)] * nodes + list(extra_shapes), max_total=max_total
    )


def cpu_cluster(cpus=4):
    return ClusterResources(total={"CPU": float(cpus)}, node_shapes=[{"CPU": float(cpus)}])


# --- role_bundles -------------------------------------------------------------------------------


def test_dedicated_gpu_one_gpu_per_rank_and_tp_gpus_per_engine():
    bundles = bundles_of(engines=2, tp=2, cpus=2)
    assert bundles["policy"] == [{"GPU": 1.0, "CPU": 2.0}] * 2
    assert bundles["critic"] == [{"GPU": 1.0, "CPU": 2.0}]
    assert bundles["reference"] == [{"GPU": 1.0, "CPU": 2.0}]
    assert bundles["reward"] == [{"GPU": 1.0, "CPU": 2.0}]
    assert bundles["rollout"] == [{"GPU": 2.0, "CPU": 2.0}] * 2


def test_colocated_gpu_roles_share_gpus_by_fraction():
    bundles = bundles_of(placement="colocated", engines=2, policy=2)
    assert set(bundles) == {"policy", "critic", "reference", "reward", "rollout"}
    fractions = {b["GPU"] for role in bundles.values() for b in role}
    assert fractions == {0.2}  # five roles on one GPU
    shared = colocated_bundles(bundles)
    assert len(shared) == 2  # max ranks of any role
    assert shared[0] == {"GPU": 1.0, "CPU": 5.0}  # rank 0 of all five roles
    assert shared[1] == {"GPU": 1.0, "CPU": 2.0}  # rank 1 of policy and rollout only


def test_colocated_rejects_tensor_parallel_engines():
    with pytest.raises(ValueError, match="shares one GPU per rank"):
        bundles_of(placement="colocated", tp=2)
    # The config refuses it first, naming its keys (the user's mistake is there, not in cluster/).
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        config_from_dict({"cluster": {"placement": "colocated"}, "rollout": {"tensor_parallel_size": 2}})


@pytest.mark.parametrize("placement", ["dedicated", "colocated"])
def test_cpu_bundles_are_cpus_per_actor_for_every_rank(placement):
    bundles = bundles_of(placement=placement, engines=3, cpus=0.5, gpu=False)
    assert bundles["rollout"] == [{"CPU": 0.5}] * 3
    assert bundles["policy"] == [{"CPU": 0.5}] * 2
    assert all("GPU" not in b for role in bundles.values() for b in role)


# --- check_feasible ------------------------------------------------------------------------------


def test_feasible_request_passes():
    check_feasible(bundles_of(), gpu_cluster(gpus_per_node=8))


def test_too_many_gpus_without_autoscaler_names_role_and_amounts():
    bundles = {"rollout": [{"GPU": 4.0, "CPU": 1.0}]}
    with pytest.raises(UserError) as err:
        check_feasible(bundles, gpu_cluster(gpus_per_node=1))
    msg = str(err.value)
    assert "'rollout'" in msg and "GPU: 4" in msg and "\n" not in msg


def test_role_total_exceeding_cluster_names_role():
    bundles = {"policy": [{"GPU": 1.0}] * 3}
    with pytest.raises(UserError, match=r"role 'policy' \(3 actors\) needs 3 GPU but the cluster has 2 GPU"):
        check_feasible(bundles, gpu_cluster(gpus_per_node=1, nodes=2))


def test_all_roles_together_exceeding_cluster_mentions_dedicated():
    bundles = bundles_of(engines=2, policy=2)  # 2 + 1 + 1 + 1 + 2 = 7 GPUs
    with pytest.raises(
        UserError, match="together .dedicated placement. needs 7 GPU but the cluster has 4 GPU"
    ):
        check_feasible(bundles, gpu_cluster(gpus_per_node=4))


def test_colocated_fits_where_dedicated_does_not():
    two_gpus = gpu_cluster(gpus_per_node=2)
    check_feasible(bundles_of(placement="colocated", engines=2, policy=2), two_gpus, colocated=True)
    with pytest.raises(UserError, match="needs 7 GPU but the cluster has 2 GPU"):  # 2 + 1 + 1 + 1 + 2
        check_feasible(bundles_of(placement="dedicated", engines=2, policy=2), two_gpus)


def test_autoscaler_maximum_makes_request_feasible():
    bundles = {"policy": [{"GPU": 1.0, "CPU": 1.0}] * 8}
    growing = gpu_cluster(
        gpus_per_node=0,
        cpus=4,
        max_total={"GPU": 16.0, "CPU": 64.0},
        extra_shapes=[{"GPU": 8.0, "CPU": 32.0}],
    )
    check_feasible(bundles, growing)
    small = gpu_cluster(
        gpus_per_node=0, cpus=4, max_total={"GPU": 4.0, "CPU": 64.0}, extra_shapes=[{"GPU": 8.0, "CPU": 32.0}]
    )
    with pytest.raises(UserError, match="an autoscaler may grow it to 4"):
        check_feasible(bundles, small)


def test_assumed_autoscaler_with_unknown_limits_accepts_anything():
    cluster = ClusterResources(total={"CPU": 4.0}, node_shapes=[{"CPU": 4.0}], unbounded=True)
    check_feasible({"rollout": [{"GPU": 8.0}] * 4}, cluster)
    assert cluster.autoscaling and use_gpu("auto", cluster) is False  # auto follows the GPUs it can see


def test_bundle_larger_than_any_node_is_infeasible_even_if_total_suffices():
    with pytest.raises(UserError, match="role 'rollout' needs .* per actor, but no node has that much"):
        check_feasible({"rollout": [{"GPU": 4.0}]}, gpu_cluster(gpus_per_node=2, nodes=2))


def test_cpu_request_beyond_cpus():
    bundles = bundles_of(engines=1, gpu=False)  # 2 + 1 + 1 + 1 + 1 = 6 actors
    check_feasible(bundles, cpu_cluster(cpus=6))
    with pytest.raises(UserError, match="needs 6 CPU but the cluster has 4 CPU"):
        check_feasible(bundles, cpu_cluster(cpus=4))


def test_use_gpu_resolution():
    assert use_gpu("auto", gpu_cluster()) is True
    assert use_gpu("auto", cpu_cluster()) is False
    assert use_gpu("cpu", gpu_cluster()) is False
    with pytest.raises(UserError, match="cluster.device=cuda"):
        use_gpu("cuda", cpu_cluster())


# --- CPU-only roles (gpus_per_rank=0: the reward function pool) ---------------------------------------


def with_function_pool(workers=3, critic=True) -> dict[str, RoleRequest]:
    roles = make_roles(engines=2) | {"reward_function": RoleRequest(workers, gpus_per_rank=0)}
    if not critic:
        del roles["critic"]
    return roles


def test_dedicated_gpu_gives_a_cpu_only_role_cpu_bundles():
    bundles = role_bundles(with_function_pool(), gpu=True, placement="dedicated", cpus_per_actor=2)
    assert bundles["reward_function"] == [{"CPU": 2.0}] * 3
    assert bundles["policy"] == [{"GPU": 1.0, "CPU": 2.0}] * 2  # the GPU roles unchanged
    check_feasible(bundles, gpu_cluster(gpus_per_node=7))  # 2 + 1 + 1 + 1 + 2 GPUs: the pool needs none


def test_colocated_shares_each_gpu_among_the_gpu_roles_only():
    bundles = role_bundles(with_function_pool(critic=False), gpu=True, placement="colocated")
    assert bundles["reward_function"] == [{"CPU": 1.0}] * 3
    gpu_fractions = {b["GPU"] for role, bl in bundles.items() if role != "reward_function" for b in bl}
    assert gpu_fractions == {0.25}  # policy, reference, reward, rollout; not 1/5
    six = role_bundles(with_function_pool(), gpu=True, placement="colocated")
    assert {b["GPU"] for role, bl in six.items() if role != "reward_function" for b in bl} == {0.2}
    assert all("GPU" not in b for b in six["reward_function"])


def test_cpu_cluster_counts_the_function_workers_like_any_actor():
    bundles = role_bundles(with_function_pool(workers=2), gpu=False, cpus_per_actor=0.5)
    assert bundles["reward_function"] == [{"CPU": 0.5}] * 2
    with pytest.raises(UserError, match="needs 4.5 CPU but the cluster has 4 CPU"):  # 9 actors x 0.5
        check_feasible(bundles, cpu_cluster(cpus=4))


# --- cluster.role_resources: custom resources per role -----------------------------------------------


def test_role_resources_pin_named_roles_and_star_covers_the_rest():
    extra = {"rollout": {"inference": 1}, "*": {"train": 0.5}}
    bundles = role_bundles(make_roles(engines=2), gpu=False, cpus_per_actor=1, extra=extra)
    assert bundles["rollout"] == [{"CPU": 1.0, "inference": 1.0}] * 2
    for role in ("policy", "critic", "reference", "reward"):
        assert all(b == {"CPU": 1.0, "train": 0.5} for b in bundles[role]), role
    gpu = role_bundles(make_roles(engines=1), gpu=True, extra={"policy": {"nvlink": 1}})
    assert gpu["policy"] == [{"GPU": 1.0, "CPU": 1.0, "nvlink": 1.0}] * 2
    assert gpu["critic"] == [{"GPU": 1.0, "CPU": 1.0}]  # no '*': the others unchanged


def test_role_resources_decide_feasibility_by_the_nodes_that_offer_them():
    bundles = role_bundles(make_roles(engines=2), gpu=False, extra={"rollout": {"inference": 1}})
    one_engine_node = ClusterResources(
        total={"CPU": 9.0, "inference": 1.0}, node_shapes=[{"CPU": 8.0}, {"CPU": 1.0, "inference": 1.0}]
    )
    with pytest.raises(
        UserError, match="role 'rollout' .* needs 2 inference but the cluster has 1 inference"
    ):
        check_feasible(bundles, one_engine_node)
    no_such_node = ClusterResources(total={"CPU": 8.0}, node_shapes=[{"CPU": 8.0}])
    with pytest.raises(
        UserError, match=r"role 'rollout' needs \{CPU: 1, inference: 1\} per actor, but no node"
    ):
        check_feasible(bundles, no_such_node)
    colocated = colocated_bundles(role_bundles(make_roles(engines=2), gpu=False, extra={"*": {"t": 1}}))
    assert (
        colocated[0]["t"] == 5.0 and colocated[1]["t"] == 2.0
    )  # rank 0 of 5 roles; rank 1 of policy, rollout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"actor": {"x": 1}}, "cluster.role_resources names 'actor', not a PPO role"),
        ({"policy": {"GPU": 1}}, "cluster.role_resources.policy asks for 'GPU': name custom resources only"),
        ({"rollout": {"x": 0}}, r"cluster.role_resources.rollout.x must be > 0"),
        ({"rollout": {"x": "one"}}, r"config key 'cluster.role_resources.rollout.x': expected float"),
        ({"rollout": 1}, r"config key 'cluster.role_resources.rollout': expected dict"),
    ],
)
def test_bad_role_resources_are_one_line_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"cluster": {"role_resources": value}})


def test_role_resources_from_the_command_line():
    cfg = config_from_dict({}, ['cluster.role_resources={"*": {train: 1}, rollout: {inference: 2}}'])
    assert cfg.cluster.role_resources == {"*": {"train": 1.0}, "rollout": {"inference": 2.0}}


def test_messages_leave_out_rays_bookkeeping_resources():
    from cluster.resources import format_resources

    node = {"CPU": 3.0, "memory": 2.4e10, "object_store_memory": 1.5e8, "node:10.0.0.5": 1.0, "aux": 3.0}
    assert format_resources(node) == "{CPU: 3, aux: 3}"
    groups = {
        "CPU_group_0_0b0841a3e705c005d374f24f015704000000": 1.0,
        "CPU_group_1bf19321ef5910913798fb6cad1604000000": 1.0,
    }
    assert format_resources(node | groups) == "{CPU: 3, aux: 3}"  # placement groups' own copies
    with pytest.raises(UserError, match=r"no node has that much \(nodes: \{CPU: 3, aux: 3\}\)$"):
        check_feasible(
            {"rollout": [{"CPU": 1.0, "engine": 1.0}]}, ClusterResources(total=node, node_shapes=[node])
        )


def colocated_config(gpus: int):
    """A GAE run with an RM on ``gpus`` shared GPUs: ``gpus`` ranks of every role and ``gpus`` engines."""
    workers = {f"{role}_workers": gpus for role in ("policy", "critic", "reference", "reward")}
    return config_from_dict(
        {
            "cluster": {"placement": "colocated", "cpus_per_actor": 0.5},
            "ppo": {**workers, "advantage": "gae", "mini_batch_size": 8 * gpus, "micro_batch_size": 2},
            "rollout": {"num_engines": gpus},
            "reward": {"path": "rm"},
        }
    )


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_colocated_plan_puts_one_engine_and_one_rank_of_every_role_on_each_gpu(gpus):
    """What ``place_roles(colocated=True)`` asks Ray for: bundle r is GPU r, holding engine r and rank r of
    the policy, critic, reference and reward; the five GPU shares fit in one GPU."""
    from trainers.ppo.setup import ppo_bundles

    bundles = ppo_bundles(colocated_config(gpus), gpu=True)
    assert sorted(bundles) == ["critic", "policy", "reference", "reward", "rollout"]
    assert all(len(ranks) == gpus for ranks in bundles.values())
    shared = colocated_bundles(bundles)
    assert shared == [{"GPU": 1.0, "CPU": 2.5}] * gpus  # 5 actors x 0.5 CPU on each GPU
    for r in range(gpus):
        assert sum(role[r]["GPU"] for role in bundles.values()) <= 1.0
    check_feasible(bundles, gpu_cluster(gpus_per_node=gpus, cpus=32), colocated=True)
    if gpus > 1:  # one GPU fewer than ranks: the shared bundles do not fit
        with pytest.raises(UserError, match=f"needs {gpus} GPU but the cluster has {gpus - 1} GPU"):
            check_feasible(bundles, gpu_cluster(gpus_per_node=gpus - 1, cpus=32), colocated=True)
