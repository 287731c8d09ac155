"""cluster/node_types.py: what an autoscaler's cluster YAML says it can add, and its fake multi-node twin."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from cluster.node_types import (
    addable_limits,
    fake_cluster_config,
    fake_node_types,
    find_autoscaler_config,
    load_cluster_yaml,
)
from cluster.resources import ClusterResources, check_feasible
from trainers.errors import UserError

REAL = yaml.safe_load((Path(__file__).resolve().parents[2] / "ray_cluster.yaml").read_text())


def two_types(cap: int = 5) -> dict:
    return {
        "max_workers": cap,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8}, "max_workers": 0},
            "big": {"resources": {"CPU": 8, "GPU": 8, "memory": 1e12}, "max_workers": 2},
            "small": {"resources": {"CPU": 32, "GPU": 1}, "max_workers": 10},
        },
    }


def test_limits_take_the_richest_types_first_up_to_the_cluster_cap():
    shapes, most = addable_limits(two_types(cap=5))
    assert shapes == [{"CPU": 8.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 1.0}]  # memory is not a role's resource
    assert most["GPU"] == 2 * 8 + 3 * 1  # both big nodes, then 3 small ones fill the cap of 5
    assert most["CPU"] == 5 * 32  # five small nodes are the most CPU
    _, uncapped = addable_limits(two_types(cap=100))
    assert uncapped["GPU"] == 2 * 8 + 10 * 1


def test_a_type_left_to_the_provider_makes_the_limits_unknown():
    cfg = two_types()
    cfg["available_node_types"]["small"]["resources"] = {}
    assert addable_limits(cfg) is None


def test_ray_cluster_yaml_states_what_its_gpu_workers_hold():
    shapes, most = addable_limits(REAL)
    assert shapes == [{"CPU": 192.0, "GPU": 8.0}] and most == {"CPU": 384.0, "GPU": 16.0}
    cluster = ClusterResources(total={"CPU": 8.0}, node_shapes=[{"CPU": 8.0}, *shapes], max_total=most)
    check_feasible({"policy": [{"GPU": 8.0, "CPU": 1.0}] * 2}, cluster)  # two full nodes: fits
    with pytest.raises(UserError, match="no node has that much"):
        check_feasible({"rollout": [{"GPU": 9.0, "CPU": 1.0}]}, cluster)
    with pytest.raises(UserError, match="needs 17 GPU .* an autoscaler may grow it to 16"):
        check_feasible({"policy": [{"GPU": 1.0, "CPU": 1.0}] * 17}, cluster)


def test_fake_types_keep_names_and_counts_and_stand_in_for_gpus():
    fake = fake_node_types(REAL, cpus_per_node=4)
    assert fake == {
        "gpu_worker": {
            "resources": {"CPU": 4.0, "gpu_standin": 8.0},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,
        }
    }
    bad = copy.deepcopy(REAL)
    bad["available_node_types"]["gpu_worker"]["resources"] = {}
    with pytest.raises(ValueError, match="gpu_worker"):
        fake_node_types(bad, cpus_per_node=4)


def test_fake_config_passes_rays_schema_and_points_at_the_given_gcs():
    cfg = fake_cluster_config(REAL, gcs_address="10.0.0.1:7000", cpus_per_node=4, idle_timeout_minutes=0.1)
    # Ray's schema alone: prepare_config would merge in the provider's example.yaml, which this Ray wheel
    # does not ship (nor can ray.cluster_utils.AutoscalingCluster, which reads it, start here).
    validate_config(copy.deepcopy(cfg))
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["provider"]["gcs_address"] == "10.0.0.1:7000"
    assert cfg["max_workers"] == REAL["max_workers"] and cfg["idle_timeout_minutes"] == 0.1
    assert cfg["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0


def test_finding_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_autoscaler_config("auto") is None and find_autoscaler_config("") is None
    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text(yaml.safe_dump(two_types()))
    assert find_autoscaler_config("auto") == boot  # where `ray up` leaves it on the head
    assert find_autoscaler_config("") is None  # '' turns the lookup off
    with pytest.raises(UserError, match=r"^cluster.autoscaler_config: no such file: .*missing.yaml$"):
        find_autoscaler_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", "cannot read"),
        ("just a string", "has no available_node_types"),
        ("available_node_types: {w: {resources: [1]}}", "node type 'w' has no resources mapping"),
    ],
)
def test_a_file_that_is_not_a_cluster_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_cluster_yaml(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_type_without_max_workers_counts_the_cluster_cap_in_limits_and_fake_types_alike():
    cfg = two_types(cap=3)
    del cfg["available_node_types"]["small"]["max_workers"]
    _, most = addable_limits(cfg)
    assert most["CPU"] == 3 * 32  # Ray's default for a type: the cluster-wide max_workers
    fake = fake_node_types(cfg, cpus_per_node=2)
    assert fake["small"]["max_workers"] == 3 and fake["big"]["max_workers"] == 2
