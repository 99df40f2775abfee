"""Ancestral sampling of the VDM chain, in plain PyTorch (``gamma`` per example, ``[B]``)."""

import torch
from torch import Tensor

from vdm_fast.diffusion.process import alpha_sigma, per_example


def ancestral_step(z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                   noise: Tensor) -> Tensor:
    """One step ``z_t -> z_s`` of ancestral sampling (``s < t``, ``gamma`` per example)."""
    g_t, g_s = per_example(gamma_t, z_t), per_example(gamma_s, z_t)
    c = -torch.expm1(g_s - g_t)
    alpha_t, sigma_t = alpha_sigma(g_t)
    alpha_s, sigma_s = alpha_sigma(g_s)
    mean = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat.to(z_t.dtype))
    return mean + torch.sqrt(sigma_s**2 * c) * noise
