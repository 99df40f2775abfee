"""The weightings of the diffusion loss over log-SNR (Kingma and Gao 2023): their names and the
per-example factor each puts on the bound's diffusion term. The one place that knows them."""

import torch
from torch import Tensor

# "elbo": w = 1 (the bound itself); "sigmoid": sigmoid(sigmoid_bias - lambda); "eps_mse": the
# "simple" loss 0.5 ||eps - eps_hat||^2.
WEIGHTINGS = ("elbo", "sigmoid", "eps_mse")


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
    names = ", ".join(map(repr, WEIGHTINGS[:-1])) + f" or {WEIGHTINGS[-1]!r}"
    raise ValueError(f"weighting must be {names}, got {weighting!r}")
