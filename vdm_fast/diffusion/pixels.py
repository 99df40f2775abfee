"""Pixels and the bound's units: integer data to the model's ``[-1, 1]`` grid and back (the
factorised decoder ``p(x | z_0)``), and nats to bits per dimension."""

import math

import torch
from torch import Tensor

from vdm_fast.diffusion.process import per_example


def encode(x: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer data in ``[0, vocab)`` to the centres of ``vocab`` equal bins of ``[-1, 1]``."""
    return 2.0 * (x.to(dtype) + 0.5) / vocab_size - 1.0


def decoder_logits(z0_rescaled: Tensor, gamma_0: Tensor, vocab_size: int) -> Tensor:
    """Logits ``[..., vocab]`` of the factorised decoder ``p(x | z_0)``.

    ``z0_rescaled = z_0 / alpha_0``; the logit of value ``v`` is
    ``-0.5 exp(-gamma_0) (z0_rescaled - encode(v))^2``.
    """
    grid = encode(torch.arange(vocab_size, device=z0_rescaled.device), vocab_size, z0_rescaled.dtype)
    precision = torch.exp(-per_example(gamma_0, z0_rescaled)).unsqueeze(-1)
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


def bits_per_dim(loss_nats: Tensor, dims: int) -> Tensor:
    """Nats per example to bits per dimension."""
    return loss_nats / (dims * math.log(2.0))
