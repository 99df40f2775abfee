"""Noise schedules ``gamma(t)`` and their time derivatives, in plain PyTorch.

Each function returns ``(gamma, dgamma_dt)`` of the shape of ``t``. The monotone network's
derivative goes through autograd with ``create_graph=True``, as a user without vdm_fast would
write it; ``vdm_fast.ops.schedule`` replaces that with one fused pass.
"""

import torch
from torch import Tensor


def fixed_linear(t: Tensor, gamma_min: float, gamma_max: float):
    """``gamma_min + (gamma_max - gamma_min) t``."""
    gamma = gamma_min + (gamma_max - gamma_min) * t
    return gamma, torch.full_like(t, gamma_max - gamma_min)


def learned_scalar(t: Tensor, w: Tensor, b: Tensor):
    """``b + |w| t`` with scalar parameters ``w``, ``b`` of shape ``[1]``."""
    slope = torch.abs(w)
    return b + slope * t, slope.expand_as(t)


def nnet_gamma(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor) -> Tensor:
    """The official monotone network (``NoiseSchedule_NNet``), torch ``Linear`` layout.

    ``gamma(t) = b1 + |w1| t + (1/n) sum_j |w3_j| (2 sigmoid(|w2_j| (2t - 1) + b2_j) - 1)``
    with ``w1 [1, 1], b1 [1], w2 [n, 1], b2 [n], w3 [1, n]``.
    """
    t = t.reshape(-1, 1)
    linear = t @ torch.abs(w1).T + b1
    h = torch.sigmoid((2.0 * t - 1.0) @ torch.abs(w2).T + b2)
    nonlinear = (2.0 * h - 1.0) @ torch.abs(w3).T / w2.shape[0]
    return (linear + nonlinear).reshape(-1)


def nnet(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor):
    """``(gamma, gamma')`` of the monotone network; ``gamma'`` through autograd.

    ``create_graph`` keeps ``gamma'`` differentiable, so a loss weighted by it trains the
    parameters (a double backward): exactly the cost the fused op removes.
    """
    with torch.enable_grad():
        if not t.requires_grad:
            t = t.detach().requires_grad_(True)
        gamma = nnet_gamma(t, w1, b1, w2, b2, w3)
        (dgamma_dt,) = torch.autograd.grad(gamma.sum(), t, create_graph=True)
    return gamma, dgamma_dt
