"""The U-Net's self-attention block (official ``AttnBlock``), in plain PyTorch."""

import torch.nn.functional as F
from torch import Tensor

from vdm_fast.reference.norm import group_norm_silu


def attention_block(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, w_qkv: Tensor, b_qkv: Tensor,
                    w_out: Tensor, b_out: Tensor, num_heads: int = 1, num_groups: int = 32,
                    eps: float = 1e-6) -> Tensor:
    """``x + proj_out(attention(GroupNorm(x)))`` over the ``H * W`` tokens of ``x`` (NCHW).

    ``w_qkv [3C, C]`` and ``w_out [C, C]`` are the 1x1 projections in ``Linear`` layout; the
    softmax scale is ``1 / sqrt(C / num_heads)``.
    """
    B, C, H, W = x.shape
    h = group_norm_silu(x, norm_weight, norm_bias, num_groups, eps, silu=False)
    tokens = h.flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = F.linear(tokens, w_qkv, b_qkv).chunk(3, dim=-1)

    def heads(u):  # [B, HW, C] -> [B, heads, HW, head_dim]
        return u.reshape(B, H * W, num_heads, C // num_heads).transpose(1, 2)

    a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    a = a.transpose(1, 2).reshape(B, H * W, C)
    out = F.linear(a, w_out, b_out)
    return x + out.transpose(1, 2).reshape(B, C, H, W)
