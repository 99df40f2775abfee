"""GroupNorm (+ swish) of the U-Net, in plain PyTorch."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int = 32,
                    eps: float = 1e-6, silu: bool = True, cond: Optional[Tensor] = None) -> Tensor:
    """``silu(GroupNorm(x + cond[:, :, None, None]))``; ``cond`` (``[B, C]``) and ``silu`` optional.

    Statistics in float32 (float64 for float64 input); the result has ``x``'s dtype.
    """
    if cond is not None:
        x = x + cond[:, :, None, None].to(x.dtype)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = F.group_norm(x.to(compute), num_groups, weight.to(compute), bias.to(compute), eps)
    if silu:
        h = F.silu(h)
    return h.to(x.dtype)
