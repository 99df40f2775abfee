"""``diffusion/times.py``: antithetic times and the T-step grid."""

import torch
from helpers import assert_close

from vdm_fast.diffusion import times as ref_times


def test_antithetic_discretised_times_stay_on_the_grid():
    t, s = ref_times.discretize_time(torch.tensor([0.0, 1e-6, 0.5, 1.0]), 10)
    assert torch.allclose(t, torch.tensor([0.1, 0.1, 0.5, 1.0]))
    assert torch.allclose(s, t - 0.1) and (s >= 0).all()


def test_antithetic_times_cover_the_unit_interval_evenly():
    g = torch.Generator().manual_seed(3)
    t = ref_times.antithetic_times(8, generator=g)
    assert ((t >= 0) & (t < 1)).all()
    gaps = torch.diff(torch.sort(t).values)
    assert_close(gaps, torch.full((7,), 1 / 8), 1e-5)
