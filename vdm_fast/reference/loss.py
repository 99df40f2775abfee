"""The VDM variational bound in plain PyTorch (docs/design/math.md).

Shapes: data and noise are ``[B, ...]``; ``gamma`` arguments hold one value per example, ``[B]``.
Every per-example loss returns ``[B]`` in nats. float64 inputs give float64 results.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm_fast.diffusion.parameterization import check_prediction, target_terms
from vdm_fast.diffusion.pixels import decoder_logits, encode
from vdm_fast.diffusion.process import alpha_sigma, per_example

def _sum_per_example(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)

def diffuse(f: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """The forward process ``z_t = alpha_t f + sigma_t eps``."""
    alpha, sigma = alpha_sigma(per_example(gamma, f))
    return alpha * f + sigma * eps

def prediction_error(eps: Tensor, pred: Tensor, prediction: str = "eps", x: Optional[Tensor] = None,
                     gamma_t: Optional[Tensor] = None) -> Tensor:
    """``||eps - eps_hat||^2`` per example, ``eps_hat`` the noise prediction equivalent to ``pred``,
    a ``prediction`` of kind eps, x, v or score: ``s^2 ||target - pred||^2`` with the target
    ``a eps + c x`` (``vdm_fast.diffusion.parameterization.target_terms``). The kinds other than
    eps need ``gamma_t``; x and v also ``x``, the encoded data."""
    check_prediction(prediction)
    if prediction == "eps":
        return _sum_per_example((eps - pred.to(eps.dtype)) ** 2)
    if gamma_t is None:
        raise ValueError(f"gamma_t is required for prediction={prediction!r}")
    if prediction in ("x", "v") and x is None:
        raise ValueError(f"x (the encoded data) is required for prediction={prediction!r}")
    a, c, s2 = target_terms(prediction, gamma_t)
    target = torch.zeros_like(eps)
    if a is not None:
        target = target + per_example(a, eps) * eps
    if c is not None:
        target = target + per_example(c, eps) * x
    return s2 * _sum_per_example((target - pred.to(eps.dtype)) ** 2)

def diffusion_loss(eps: Tensor, eps_hat: Tensor, dgamma_dt: Tensor, *, prediction: str = "eps",
                   x: Optional[Tensor] = None, gamma_t: Optional[Tensor] = None) -> Tensor:
    """Continuous-time diffusion loss ``0.5 gamma'(t) ||eps - eps_hat||^2`` per example; ``eps_hat``
    may be a prediction of another kind (``prediction_error``). For an x prediction this is
    ``-0.5 SNR'(t) ||x - x_hat||^2``."""
    return 0.5 * dgamma_dt * prediction_error(eps, eps_hat, prediction, x, gamma_t)

def diffusion_loss_discrete(eps: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor, T: int, *,
                            prediction: str = "eps", x: Optional[Tensor] = None) -> Tensor:
    """T-step diffusion loss ``0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2`` per example
    (``prediction``, ``x`` as in ``diffusion_loss``)."""
    weight = 0.5 * T * torch.expm1(gamma_t - gamma_s)
    return weight * prediction_error(eps, eps_hat, prediction, x, gamma_t)

def prior_loss(f: Tensor, gamma_1: Tensor) -> Tensor:
    """``KL(q(z_1 | x) || N(0, I))`` per example (``log sigma_1^2`` as ``log sigmoid``, finite
    for any ``gamma_1``)."""
    g = per_example(gamma_1, f)
    kl = 0.5 * (torch.sigmoid(-g) * f**2 + torch.sigmoid(g) - F.logsigmoid(g) - 1.0)
    return _sum_per_example(kl)

def reconstruction_loss(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int = 256) -> Tensor:
    """``-log p(x | z_0)`` per example, with ``z_0 / alpha_0 = f + exp(gamma_0 / 2) eps_0``."""
    # An x that is not an integer in [0, vocab) gives NaN (as the kernels do), not an error
    # that a traced graph could not raise nor a wrong but plausible number.
    wide = x if x.is_floating_point() else x.long()  # uint8 cannot hold vocab_size = 256
    valid = (wide >= 0) & (wide < vocab_size) & (wide == torch.floor(wide))
    x = torch.where(valid, wide, torch.zeros_like(wide))
    f = torch.where(valid, encode(x, vocab_size, eps_0.dtype), torch.nan)  # NaN flows to the gradients too
    z0_rescaled = f + torch.exp(0.5 * per_example(gamma_0, f)) * eps_0
    logprobs = torch.log_softmax(decoder_logits(z0_rescaled, gamma_0, vocab_size), dim=-1)
    nll = -torch.gather(logprobs, -1, x.long().unsqueeze(-1)).squeeze(-1)
    return _sum_per_example(nll)
