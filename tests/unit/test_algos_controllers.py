"""KL controllers (trainers/algos/controllers.py)."""

from __future__ import annotations

import pytest
import torch

from trainers.algos import AdaptiveKLController, FixedKLController, make_kl_controller, mean_sequence_kl
from trainers.errors import ConfigError


def test_fixed_controller_never_moves_and_roundtrips():
    ctl = FixedKLController(0.02)
    assert ctl.update(100.0, 512) == 0.02 and ctl.value == 0.02
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.02


def test_adaptive_controller_hand_sequence():
    # target 6, horizon 10000, 1000 sequences per batch -> mult = 1 + e * 0.1, e clipped to [-0.2, 0.2].
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12:  e = 12/6 - 1 = 1 -> clipped 0.2,    mult 1.02 -> 0.102
    assert ctl.update(12.0, 1000) == pytest.approx(0.102)
    # KL 3:   e = 0.5 - 1 = -0.5 -> clipped -0.2, mult 0.98 -> 0.09996
    assert ctl.update(3.0, 1000) == pytest.approx(0.09996)
    # KL 6.6: e = 0.1 (inside the clip),         mult 1.01 -> 0.1009596
    assert ctl.update(6.6, 1000) == pytest.approx(0.1009596)
    # KL on target: e = 0, unchanged.
    assert ctl.update(6.0, 1000) == pytest.approx(0.1009596)
    # KL 0 as a tensor: e = -1 -> -0.2, mult 0.98 -> 0.098940408
    assert ctl.update(torch.tensor(0.0), 1000) == pytest.approx(0.098940408)
    assert ctl.value == pytest.approx(0.098940408)


def test_adaptive_controller_tracks_mean_summed_kl():
    # Per-sequence sums 12 and 0 -> mean 6 = target -> no change; a per-token mean (3) would lower beta.
    kl = torch.tensor([[4.0, 4.0, 4.0], [0.0, 0.0, 0.0]])
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(mean_sequence_kl(kl, torch.ones(2, 3)), 2)
    assert ctl.value == pytest.approx(0.1)


def test_adaptive_state_dict_roundtrip_resumes_exactly():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in (20.0, 1.0, 7.0):
        ctl.update(kl, 256)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    assert resumed.update(9.0, 256) == ctl.update(9.0, 256)


def test_loading_the_wrong_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="'fixed' KL controller"):
        AdaptiveKLController(0.1, 6.0, 100).load_state_dict(FixedKLController(0.1).state_dict())


def test_factory():
    assert isinstance(make_kl_controller("fixed", 0.02), FixedKLController)
    ctl = make_kl_controller("adaptive", 0.2, target=6.0, horizon=10000)
    assert isinstance(ctl, AdaptiveKLController) and (ctl.value, ctl.target, ctl.horizon) == (
        0.2,
        6.0,
        10000.0,
    )
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        make_kl_controller("pid", 0.1)
    with pytest.raises(ConfigError, match="target and a horizon"):
        make_kl_controller("adaptive", 0.1, target=6.0)
    with pytest.raises(ConfigError):
        make_kl_controller("adaptive", 0.1, target=6.0, horizon=0)
    with pytest.raises(ConfigError):
        make_kl_controller("fixed", -0.1)
