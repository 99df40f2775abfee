"""The VDM variational bound in plain PyTorch (docs/design.md, "The math").

Shapes: data and noise are ``[B, ...]``; ``gamma`` arguments hold one value per example, ``[B]``.
Every per-example loss returns ``[B]`` in nats. float64 inputs give float64 results.
"""

import math

import torch
from torch import Tensor


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[B]`` tensor to broadcast against ``like`` of shape ``[B, ...]``."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def _sum_per_example(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)


def encode(x: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer data in ``[0, vocab)`` to the centres of ``vocab`` equal bins of ``[-1, 1]``."""
    return 2.0 * (x.to(dtype) + 0.5) / vocab_size - 1.0


def decoder_logits(z0_rescaled: Tensor, gamma_0: Tensor, vocab_size: int) -> Tensor:
    """Logits ``[..., vocab]`` of the factorised decoder ``p(x | z_0)``.

    ``z0_rescaled = z_0 / alpha_0``; the logit of value ``v`` is
    ``-0.5 exp(-gamma_0) (z0_rescaled - encode(v))^2``.
    """
    grid = encode(torch.arange(vocab_size, device=z0_rescaled.device), vocab_size, z0_rescaled.dtype)
    precision = torch.exp(-_per_example(gamma_0, z0_rescaled)).unsqueeze(-1)
    return -0.5 * precision * (z0_rescaled.unsqueeze(-1) - grid) ** 2


def decode(z0_rescaled: Tensor, gamma_0: Tensor, vocab_size: int, sample: bool = False,
           generator: torch.Generator = None) -> Tensor:
    """Integer images (int64) from ``p(x | z_0)``: the argmax, or a sample when ``sample``."""
    logits = decoder_logits(z0_rescaled, gamma_0, vocab_size)
    if not sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, vocab_size), 1, generator=generator)
    return flat.reshape(z0_rescaled.shape)


def alpha_sigma(gamma: Tensor):
    """``(alpha, sigma)`` with ``sigma^2 = sigmoid(gamma)`` and ``alpha^2 = sigmoid(-gamma)``."""
    return torch.sqrt(torch.sigmoid(-gamma)), torch.sqrt(torch.sigmoid(gamma))


def diffuse(f: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """The forward process ``z_t = alpha_t f + sigma_t eps``."""
    alpha, sigma = alpha_sigma(_per_example(gamma, f))
    return alpha * f + sigma * eps


def diffusion_loss(eps: Tensor, eps_hat: Tensor, dgamma_dt: Tensor) -> Tensor:
    """Continuous-time diffusion loss ``0.5 gamma'(t) ||eps - eps_hat||^2`` per example."""
    return 0.5 * dgamma_dt * _sum_per_example((eps - eps_hat.to(eps.dtype)) ** 2)


def diffusion_loss_discrete(eps: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                            T: int) -> Tensor:
    """T-step diffusion loss ``0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2``."""
    weight = 0.5 * T * torch.expm1(gamma_t - gamma_s)
    return weight * _sum_per_example((eps - eps_hat.to(eps.dtype)) ** 2)


def prior_loss(f: Tensor, gamma_1: Tensor) -> Tensor:
    """``KL(q(z_1 | x) || N(0, I))`` per example."""
    var_1 = torch.sigmoid(_per_example(gamma_1, f))
    kl = 0.5 * ((1.0 - var_1) * f**2 + var_1 - torch.log(var_1) - 1.0)
    return _sum_per_example(kl)


def reconstruction_loss(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int = 256) -> Tensor:
    """``-log p(x | z_0)`` per example, with ``z_0 / alpha_0 = f + exp(gamma_0 / 2) eps_0``."""
    # An x that is not an integer in [0, vocab) gives NaN (as the kernels do), not an error
    # that a traced graph could not raise nor a wrong but plausible number.
    wide = x if x.is_floating_point() else x.long()  # uint8 cannot hold vocab_size = 256
    valid = (wide >= 0) & (wide < vocab_size) & (wide == torch.floor(wide))
    x = torch.where(valid, wide, torch.zeros_like(wide))
    f = torch.where(valid, encode(x, vocab_size, eps_0.dtype), torch.nan)  # NaN flows to the gradients too
    z0_rescaled = f + torch.exp(0.5 * _per_example(gamma_0, f)) * eps_0
    logprobs = torch.log_softmax(decoder_logits(z0_rescaled, gamma_0, vocab_size), dim=-1)
    nll = -torch.gather(logprobs, -1, x.long().unsqueeze(-1)).squeeze(-1)
    return _sum_per_example(nll)


def bits_per_dim(loss_nats: Tensor, dims: int) -> Tensor:
    """Nats per example to bits per dimension."""
    return loss_nats / (dims * math.log(2.0))


def discretize_time(t: Tensor, T: int):
    """``(t, s)`` of the T-step loss: ``t`` rounded up to the grid ``i / T``, ``s = t - 1/T``.

    A time of exactly 0 goes to ``1/T`` (not 0), so that ``s`` never leaves ``[0, 1]``.
    """
    t = torch.clamp(torch.ceil(t * T), min=1.0) / T
    return t, t - 1.0 / T


def ancestral_step(z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                   noise: Tensor) -> Tensor:
    """One step ``z_t -> z_s`` of ancestral sampling (``s < t``, ``gamma`` per example)."""
    g_t, g_s = _per_example(gamma_t, z_t), _per_example(gamma_s, z_t)
    c = -torch.expm1(g_s - g_t)
    alpha_t, sigma_t = alpha_sigma(g_t)
    alpha_s, sigma_s = alpha_sigma(g_s)
    mean = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat.to(z_t.dtype))
    return mean + torch.sqrt(sigma_s**2 * c) * noise


def diffusion_weight(weighting: str, gamma_t: Tensor, dgamma_dt: Tensor, gamma_s: Tensor = None,
                     T: int = 0, sigmoid_bias: float = 0.0) -> Tensor:
    """Per-example factor ``w(lambda_t)`` on the bound's diffusion term (``lambda = -gamma``),
    Kingma and Gao 2023: ``"elbo"``: 1; ``"sigmoid"``: ``sigmoid(sigmoid_bias - lambda)``;
    ``"eps_mse"``: whatever turns the term into ``0.5 ||eps - eps_hat||^2`` (the "simple" loss),
    i.e. ``1 / gamma'`` in continuous time and ``1 / (T expm1(gamma_t - gamma_s))`` with T steps.
    """
    if weighting == "elbo":
        return torch.ones_like(gamma_t)
    if weighting == "sigmoid":
        return torch.sigmoid(sigmoid_bias + gamma_t)
    if weighting == "eps_mse":
        return 1.0 / (T * torch.expm1(gamma_t - gamma_s)) if T else 1.0 / dgamma_dt
    raise ValueError(f"weighting must be 'elbo', 'sigmoid' or 'eps_mse', got {weighting!r}")
