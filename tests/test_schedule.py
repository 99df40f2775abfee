"""The schedule family: gamma(t), gamma'(t) and antithetic times."""

import pytest
import torch
from helpers import assert_close

from vdm_fast import nn as vnn
from vdm_fast.reference import schedule as ref


def _random_nnet_params(n=64, dtype=torch.float64):
    """Random raw parameters, negative weights included (the network uses |w|)."""
    return (torch.randn(1, 1, dtype=dtype) * 5, torch.randn(1, dtype=dtype) * 5,
            torch.randn(n, 1, dtype=dtype) * 3, torch.randn(n, dtype=dtype) * 2,
            torch.randn(1, n, dtype=dtype) * 10)


@pytest.mark.parametrize("seed", range(5))
def test_nnet_schedule_is_increasing_and_its_derivative_matches_finite_differences(seed):
    torch.manual_seed(seed)
    params = _random_nnet_params()
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    gamma, dgamma = ref.nnet(t, *params)
    assert (gamma[1:] > gamma[:-1]).all() and (dgamma > 0).all()
    h = 1e-6
    t_in = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    fd = (ref.nnet_gamma(t_in + h, *params) - ref.nnet_gamma(t_in - h, *params)) / (2 * h)
    assert_close(ref.nnet(t_in, *params)[1], fd, 1e-7)


def test_nnet_schedule_formula_at_the_endpoints():
    w1, b1, w2, b2, w3 = _random_nnet_params(n=8)
    n = 8
    for t in (0.0, 1.0):
        h = torch.sigmoid(w2.abs()[:, 0] * (2 * t - 1) + b2)
        expected = b1 + w1.abs()[0] * t + (w3.abs()[0] * (2 * h - 1)).sum() / n
        assert_close(ref.nnet_gamma(torch.tensor([t], dtype=torch.float64), w1, b1, w2, b2, w3), expected, 1e-14)


def test_schedule_modules_start_at_the_configured_endpoints():
    t = torch.tensor([0.0, 0.25, 1.0])
    fixed = vnn.FixedLinearSchedule(-13.3, 5.0)
    for cls in (vnn.FixedLinearSchedule, vnn.LearnedScalarSchedule):
        gamma, dgamma = cls(-13.3, 5.0)(t)
        assert_close(gamma, torch.tensor([-13.3, -13.3 + 0.25 * 18.3, 5.0]), 1e-6)
        assert_close(dgamma, torch.full((3,), 18.3), 1e-6)
    # The network adds a small (init std 0.01) nonlinear part to the same linear schedule.
    gamma, dgamma = vnn.MonotoneNetSchedule(-13.3, 5.0)(t)
    assert_close(gamma, fixed(t)[0], 0.01)
    assert vnn.MonotoneNetSchedule().w2.shape == (1024, 1)


def test_learned_schedules_train_through_gamma_and_its_derivative():
    for schedule in (vnn.LearnedScalarSchedule(), vnn.MonotoneNetSchedule(n_features=16)):
        gamma, dgamma = schedule(torch.rand(8))
        (gamma.sum() + dgamma.sum()).backward()
        grads = [p.grad for p in schedule.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_antithetic_times_cover_the_unit_interval_evenly():
    g = torch.Generator().manual_seed(3)
    t = ref.antithetic_times(8, generator=g)
    assert ((t >= 0) & (t < 1)).all()
    gaps = torch.diff(torch.sort(t).values)
    assert_close(gaps, torch.full((7,), 1 / 8), 1e-5)


def test_schedule_rejects_bad_endpoints():
    with pytest.raises(ValueError, match="gamma_min"):
        vnn.FixedLinearSchedule(5.0, -13.3)
