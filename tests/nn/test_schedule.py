"""``nn/schedule.py``: the schedule modules' endpoints, their training through gamma and gamma',
and bad endpoints refused. (The fused op under ``MonotoneNetSchedule``: tests/ops/test_schedule.py.)"""

import pytest
import torch
from helpers import assert_close

from vdm_fast import nn as vnn


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


def test_schedule_rejects_bad_endpoints():
    with pytest.raises(ValueError, match="gamma_min"):
        vnn.FixedLinearSchedule(5.0, -13.3)
