"""Input and time features of the VDM score network."""

import math

import torch
from torch import Tensor


def fourier_features(z: Tensor, first: int = 6, last: int = 7) -> Tensor:
    """``sin`` and ``cos`` of ``2^k * 2 pi * z`` for ``k = first..last``, NCHW.

    Channels are ordered as in the official ``Base2FourierFeatures``: per input channel, per
    frequency; all sines, then all cosines. Output: ``[B, 2 * C * n_freq, H, W]``.
    """
    freqs = 2.0 ** torch.arange(first, last + 1, device=z.device, dtype=z.dtype) * 2 * math.pi
    h = z.unsqueeze(2) * freqs.reshape(1, 1, -1, 1, 1)  # [B, C, F, H, W]
    h = h.flatten(1, 2)
    return torch.cat([torch.sin(h), torch.cos(h)], dim=1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (real-valued) steps ``t``, the fairseq form.

    Frequencies ``exp(-log(max_period) k / (dim/2 - 1))``; sines then cosines; odd ``dim``
    zero-padded.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / (half - 1) * torch.arange(half, device=t.device, dtype=t.dtype))
    args = t.reshape(-1, 1) * freqs
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
