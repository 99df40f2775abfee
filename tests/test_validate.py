"""``vdm_fast.validate``: the argument checks the ops share reach every tensor an op takes, the
optional ones included, and name it."""

import pytest
import torch

from vdm_fast import ops


def test_every_optional_tensor_is_checked():
    B = 3
    eps, pred = torch.randn(B, 4), torch.randn(B, 4)
    dg, g = torch.rand(B), torch.randn(B)
    with pytest.raises(ValueError, match="x is a meta tensor"):
        ops.diffusion_loss(eps, pred, dg, prediction="x", x=torch.empty(B, 4, device="meta"), gamma_t=g)
    with pytest.raises(ValueError, match="x must have the shape"):
        ops.diffusion_loss(eps, pred, dg, x=torch.randn(B, 5))  # unused by eps, checked all the same
    x = torch.randn(2, 32, 4, 4)
    C = 32
    weights = dict(norm_weight=torch.ones(C), norm_bias=torch.zeros(C), w_qkv=torch.randn(3 * C, C),
                   b_qkv=torch.zeros(3 * C), w_out=torch.randn(C, C), b_out=torch.zeros(C))
    with pytest.raises(ValueError, match="w_out is a meta tensor"):
        ops.attention_block(x, **{**weights, "w_out": torch.empty(C, C, device="meta")})
    with pytest.raises(TypeError, match="w_out is torch.float64 but w_qkv is torch.float32"):
        ops.attention_block(x, **{**weights, "w_out": torch.randn(C, C, dtype=torch.float64)})
    with pytest.raises(TypeError, match="x is torch.float64 but the weights are torch.float32"):
        ops.attention_block(x.double(), **weights)
    with pytest.raises(ValueError, match="num_groups must be > 0"):
        ops.attention_block(x, **weights, num_groups=0)
    with pytest.raises(ValueError, match="num_groups must be > 0"):
        ops.group_norm_silu(x, torch.ones(C), torch.zeros(C), num_groups=0)
    with pytest.raises(ValueError, match="cond is a meta tensor"):
        ops.group_norm_silu(x, torch.ones(C), torch.zeros(C), cond=torch.empty(2, C, device="meta"))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        ops.group_norm_silu(x, [1.0] * C, torch.zeros(C))
    t = torch.rand(4)
    w = [torch.randn(1, 1), torch.randn(1), torch.randn(5, 1), torch.randn(5), torch.randn(1, 5)]
    with pytest.raises(TypeError, match="gamma_1 must have t's dtype"):
        ops.gamma_nnet_pinned(t, *w, torch.zeros(1), torch.ones(1, dtype=torch.float64))
