"""The unified view (Luo, "Understanding Diffusion Models"): one network, four targets.

Given ``z_t = alpha_t x + sigma_t eps``, a network can predict the noise ``eps``, the data
``x``, the velocity ``v = alpha_t eps - sigma_t x`` or the score ``-eps / sigma_t``. Each is an
exact function of another given ``z_t`` and ``gamma_t``; the VLB is the same for equivalent
predictions. Shapes: predictions and ``z`` are ``[B, ...]``, ``gamma`` is ``[B]``.
"""

import torch
from torch import Tensor

from vdm_fast.diffusion.process import alpha_sigma, per_example

PREDICTIONS = ("eps", "x", "v", "score")


def check_prediction(kind: str) -> str:
    """``kind`` if it names a prediction, else a ``ValueError`` naming the choices: the one check
    of prediction names (the ops, ``VDM`` and the configuration use it)."""
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {kind!r}")
    return kind


def to_eps(pred: Tensor, z: Tensor, gamma: Tensor, kind: str) -> Tensor:
    """The noise prediction equivalent to ``pred`` (a ``kind`` prediction) at ``(z, gamma)``."""
    check_prediction(kind)
    alpha, sigma = alpha_sigma(per_example(gamma, z))
    if kind == "eps":
        return pred
    if kind == "x":
        return (z - alpha * pred) / sigma
    if kind == "v":
        return sigma * z + alpha * pred  # eps = sigma z + alpha v for the variance-preserving process
    return -sigma * pred


def from_eps(eps: Tensor, z: Tensor, gamma: Tensor, kind: str) -> Tensor:
    """The ``kind`` prediction equivalent to the noise prediction ``eps`` at ``(z, gamma)``."""
    check_prediction(kind)
    alpha, sigma = alpha_sigma(per_example(gamma, z))
    if kind == "eps":
        return eps
    if kind == "x":
        return (z - sigma * eps) / alpha
    if kind == "v":
        return (eps - sigma * z) / alpha
    return -eps / sigma


def convert(pred: Tensor, z: Tensor, gamma: Tensor, source: str, target: str) -> Tensor:
    """A ``source`` prediction expressed as a ``target`` prediction."""
    return from_eps(to_eps(pred, z, gamma, source), z, gamma, target)


def target_terms(kind: str, gamma: Tensor):
    """The regression target of a ``kind`` prediction as ``a eps + c x`` (``[B]`` coefficients,
    None for an absent term) and ``s`` with ``eps - eps_hat = s (target - pred)``:

    ====== ================ =================== ====================
    kind   a (times eps)    c (times x)         s^2 (loss weight)
    ====== ================ =================== ====================
    eps    1                -                   1
    x      -                1                   SNR = alpha^2/sigma^2
    v      alpha            -sigma              alpha^2
    score  -1/sigma         -                   sigma^2
    ====== ================ =================== ====================
    """
    check_prediction(kind)
    alpha, sigma = alpha_sigma(gamma)
    if kind == "eps":
        return torch.ones_like(gamma), None, torch.ones_like(gamma)
    if kind == "x":
        return None, torch.ones_like(gamma), torch.exp(-gamma)
    if kind == "v":
        return alpha, -sigma, alpha**2
    return -1.0 / sigma, None, sigma**2
