"""The coefficients of the forward process ``z_t = alpha_t x + sigma_t eps``, shared by the loss
terms, the parameterisations and the sampler."""

import torch
from torch import Tensor


def per_example(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[B]`` tensor to broadcast against ``like`` of shape ``[B, ...]``."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def alpha_sigma(gamma: Tensor):
    """``(alpha, sigma)`` with ``sigma^2 = sigmoid(gamma)`` and ``alpha^2 = sigmoid(-gamma)``."""
    return torch.sqrt(torch.sigmoid(-gamma)), torch.sqrt(torch.sigmoid(gamma))
