"""``diffusion/sampling.py``: the ancestral step."""

import torch
from helpers import assert_close

from vdm_fast.diffusion import sampling
from vdm_fast.diffusion.process import alpha_sigma
from vdm_fast.reference import loss as ref_loss


def test_ancestral_step_matches_the_gaussian_posterior():
    """With eps_hat = the true eps, the step's mean is E[z_s | z_t, x] of q."""
    x = torch.randn(1000, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    g_t, g_s = torch.full((1000,), 2.0, dtype=torch.float64), torch.full((1000,), -1.0, dtype=torch.float64)
    z_t = ref_loss.diffuse(x, eps, g_t)
    mean = sampling.ancestral_step(z_t, eps, g_t, g_s, torch.zeros_like(x))
    # q(z_s | z_t, x) mean: (alpha_t|s sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_t|s^2 / sigma_t^2) x
    a_t, s_t = alpha_sigma(g_t[:, None])
    a_s, s_s = alpha_sigma(g_s[:, None])
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    expected = (a_ts * s_s**2 / s_t**2) * z_t + (a_s * var_ts / s_t**2) * x
    assert_close(mean, expected, 1e-12)
