"""The U-Net's normalisation and attention blocks, on ``vdm_fast.ops`` (``vdm_fast.backend``
chooses the kernels or the reference; the parameters are the same either way)."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from vdm_fast import ops


def lecun_normal_(weight: Tensor) -> Tensor:
    """flax's default kernel init: truncated normal, variance ``1 / fan_in``."""
    fan_in = weight[0].numel()
    # 0.8796... is the std of a standard normal truncated to [-2, 2]; dividing restores 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _init_kernel(weight: Tensor, zero: bool) -> None:
    if zero:  # the official code zero-initialises layers that end a residual branch
        nn.init.zeros_(weight)
    else:
        lecun_normal_(weight)


def dense(in_features: int, out_features: int, bias: bool = True, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    _init_kernel(layer.weight, zero)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def conv3x3(in_channels: int, out_channels: int, zero: bool = False) -> nn.Conv2d:
    layer = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    _init_kernel(layer.weight, zero)
    nn.init.zeros_(layer.bias)
    return layer


class GroupNormSiLU(nn.Module):
    """``silu(GroupNorm(x + cond))`` with flax's eps 1e-6; ``silu`` and ``cond`` optional."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-6, silu: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu, cond)


class AttnBlock(nn.Module):
    """The official ``AttnBlock``: ``x + proj_out(attention(GroupNorm(x)))`` over ``H * W`` tokens."""

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = GroupNormSiLU(channels, num_groups, eps, silu=False)
        self.qkv = dense(channels, 3 * channels)
        self.proj_out = dense(channels, channels, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        return ops.attention_block(x, self.norm.weight, self.norm.bias, self.qkv.weight, self.qkv.bias,
                                         self.proj_out.weight, self.proj_out.bias, self.num_heads,
                                         self.norm.num_groups, self.norm.eps)
