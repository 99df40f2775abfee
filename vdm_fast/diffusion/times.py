"""How training times are drawn, and how they are put on the T-step grid, in plain PyTorch.

``t`` is ``[B]`` in ``[0, 1]``; the T-step loss takes ``t`` on the grid ``i / T`` and
``s = t - 1/T``.
"""

import torch
from torch import Tensor


def antithetic_times(batch_size: int, generator: torch.Generator = None, device=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Low-discrepancy times ``t_i = (u + i / B) mod 1`` with one uniform ``u`` per batch.

    The batch then covers ``[0, 1)`` evenly, which lowers the variance of the diffusion loss.
    """
    u = torch.rand((), generator=generator, device=device, dtype=dtype)
    return torch.remainder(u + torch.arange(batch_size, device=device, dtype=dtype) / batch_size, 1.0)


def discretize_time(t: Tensor, T: int):
    """``(t, s)`` of the T-step loss: ``t`` rounded up to the grid ``i / T``, ``s = t - 1/T``.

    A time of exactly 0 goes to ``1/T`` (not 0), so that ``s`` never leaves ``[0, 1]``.
    """
    t = torch.clamp(torch.ceil(t * T), min=1.0) / T
    return t, t - 1.0 / T
