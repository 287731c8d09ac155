"""ray_cluster.yaml is a real autoscaler config: it passes Ray's own cluster-config schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CFG = yaml.safe_load((Path(__file__).resolve().parents[2] / "ray_cluster.yaml").read_text())


def test_passes_ray_schema():
    validate_config(prepare_config(copy.deepcopy(CFG)))


def test_schema_check_can_fail():
    bad = copy.deepcopy(CFG)
    bad["available_node_types"]["gpu_worker"]["max_workers"] = "two"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate_config(prepare_config(bad))


def test_gpu_workers_autoscale_and_dashboard_stays_local():
    gpu = CFG["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] < gpu["max_workers"]
    assert gpu["resources"]["GPU"] > 0 and gpu["resources"]["CPU"] > 0  # stated: drivers read the limits
    assert any("'.[gpu]'" in c for c in CFG["setup_commands"])
    head_cmd = " ".join(CFG["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd  # reachable only through `ray dashboard` (SSH tunnel)
