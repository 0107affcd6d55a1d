"""AdaptiveIBController: hand-computed trajectories, clipping, NaN skipping, state round trip."""

import json
import math

import pytest
import torch

from grace.distill import AdaptiveIBController, reduce_for_controller


def test_hand_computed_trajectory():
    c = AdaptiveIBController(tau=1.0, eta=0.1, beta_init=0.5, beta_min=0.0, beta_max=10.0, ema_decay=0.5)
    # step 1: ema seeded with 3.0            -> beta = 0.5 + 0.1 * (3.0 - 1.0) = 0.7
    # step 2: ema = 0.5*3.0 + 0.5*1.0 = 2.0  -> beta = 0.7 + 0.1 * 1.0 = 0.8
    # step 3: ema = 0.5*2.0 + 0.5*0.0 = 1.0  -> beta = 0.8 + 0 = 0.8
    # step 4: ema = 0.5*1.0 + 0.5*(-1) = 0.0 -> beta = 0.8 - 0.1 = 0.7
    expected = [(3.0, 3.0, 0.7), (1.0, 2.0, 0.8), (0.0, 1.0, 0.8), (-1.0, 0.0, 0.7)]
    for value, ema, beta in expected:
        assert c.update(value) == pytest.approx(beta)
        assert c.ema == pytest.approx(ema)
        assert c.beta == pytest.approx(beta)
    assert c.steps == 4 and c.skipped == 0


def test_first_value_seeds_the_ema():
    c = AdaptiveIBController(tau=0.0, eta=1.0, beta_init=0.0, beta_min=-100, beta_max=100, ema_decay=0.99)
    assert c.ema is None
    c.update(5.0)
    assert c.ema == 5.0 and c.beta == 5.0       # not 0.05, as an EMA started at zero would give


def test_clipping_at_both_bounds():
    c = AdaptiveIBController(tau=0.0, eta=1.0, beta_init=1.0, beta_min=0.5, beta_max=2.0, ema_decay=0.0)
    assert c.update(10.0) == 2.0
    assert c.update(10.0) == 2.0
    assert c.update(-0.3) == pytest.approx(1.7)     # decay 0: ema = the value; moves off the bound at once
    assert c.update(-10.0) == 0.5
    with pytest.raises(ValueError):
        AdaptiveIBController(tau=0.0, eta=1.0, beta_init=3.0, beta_min=0.5, beta_max=2.0)
    with pytest.raises(ValueError):
        AdaptiveIBController(tau=0.0, eta=1.0, beta_init=1.0, beta_min=0.5, beta_max=2.0, ema_decay=1.0)


def test_non_finite_values_are_skipped_and_counted():
    c = AdaptiveIBController(tau=1.0, eta=0.5, beta_init=1.0, beta_min=0.0, beta_max=5.0, ema_decay=0.9)
    assert c.update(float("nan")) == 1.0 and c.ema is None      # a NaN cannot seed the EMA
    c.update(2.0)
    state = (c.beta, c.ema)
    for bad in (float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))):
        assert c.update(bad) == state[0]
    assert (c.beta, c.ema) == state
    assert c.skipped == 5 and c.steps == 1
    c.update(torch.tensor(3.0))                                   # tensors are accepted
    assert c.ema == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)


def test_state_round_trip_through_json():
    c = AdaptiveIBController(tau=0.7, eta=0.05, beta_init=0.3, beta_min=0.0, beta_max=1.0)
    for v in (1.2, float("nan"), 0.9, 0.4):
        c.update(v)
    state = json.loads(json.dumps(c.state_dict()))
    resumed = AdaptiveIBController(tau=0.7, eta=0.05, beta_init=0.3, beta_min=0.0, beta_max=1.0)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == c.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    for v in (0.2, 1.5):
        assert resumed.update(v) == c.update(v)
    fresh = AdaptiveIBController(tau=0.7, eta=0.05, beta_init=0.3, beta_min=0.0, beta_max=1.0)
    fresh.load_state_dict(json.loads(json.dumps(fresh.state_dict())))    # ema None survives
    assert fresh.ema is None


class TwoProcessAccelerator:
    """Stands in for accelerate.Accelerator on rank 0 of 2: reduce adds the other rank's tensor."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other_sum, other_count):
        self.other = torch.tensor([other_sum, other_count], dtype=torch.float64)

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor + self.other


def test_reduce_for_controller():
    assert reduce_for_controller([1.0, 2.0, 6.0]) == pytest.approx(3.0)
    assert math.isnan(reduce_for_controller([]))
    # rank 0 holds [1, 2], rank 1 holds [3, 4, 5]: the mean over all five values
    assert reduce_for_controller([1.0, 2.0], TwoProcessAccelerator(12.0, 3.0)) == pytest.approx(3.0)
    assert math.isnan(reduce_for_controller([1.0, 2.0], TwoProcessAccelerator(float("nan"), 1.0)))
    assert math.isnan(reduce_for_controller([], TwoProcessAccelerator(0.0, 0.0)))


def test_reduce_with_a_single_process_accelerator():
    class SingleProcess:
        num_processes = 1
        device = torch.device("cpu")

        def reduce(self, tensor, reduction="sum"):
            raise AssertionError("no collective with one process")

    assert reduce_for_controller([2.0, 4.0], SingleProcess()) == pytest.approx(3.0)
