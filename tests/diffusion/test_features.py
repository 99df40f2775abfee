"""``diffusion/features.py``: the Fourier features of z and the timestep embedding."""

import math

import torch
from helpers import assert_close

from vdm_fast.diffusion import features


def test_fourier_features_follow_the_official_channel_order():
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = features.fourier_features(z)
    assert out.shape == (2, 12, 4, 5)
    for c in range(3):
        for k, power in enumerate((6, 7)):
            arg = 2.0**power * 2 * math.pi * z[:, c]
            assert_close(out[:, 2 * c + k], torch.sin(arg), 1e-12)  # sines first ...
            assert_close(out[:, 6 + 2 * c + k], torch.cos(arg), 1e-12)  # ... then cosines


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 3.0, 500.0], dtype=torch.float64)
    emb = features.timestep_embedding(t, 9)
    half = 4
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    assert_close(emb[:, :half], torch.sin(t[:, None] * freqs), 1e-12)
    assert_close(emb[:, half:2 * half], torch.cos(t[:, None] * freqs), 1e-12)
    assert (emb[:, -1] == 0).all()
