"""``nn/unet.py``: the score network's structure, its zero-initialised output, and gradients that
reach every parameter. (The U-Net on the fused kernels against the reference U-Net: with the
attention family, tests/ops/test_attention.py.)"""

import torch

from vdm_fast import nn as vnn


def test_unet_structure_and_zero_initialised_output():
    net = vnn.ScoreUNet(in_channels=3, n_embd=32, n_layer=2, attention="all")
    assert len(net.down) == 2 and len(net.up) == 3 and len(net.up_attn) == 3
    z = torch.randn(2, 3, 5, 7)
    # conv_out starts at zero, so the untrained network returns its input (eps_hat = out + z).
    assert torch.equal(net(z, torch.tensor([-3.0, 1.0])), z)
    middle_only = vnn.ScoreUNet(in_channels=3, n_embd=32, n_layer=2)
    assert middle_only.down_attn is None and middle_only.up_attn is None


def test_unet_gradients_reach_every_parameter():
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=1, dropout=0.0)
    for p in net.parameters():  # move off the zero init so every path carries gradient
        p.data.add_(0.05 * torch.randn_like(p))
    net(torch.randn(2, 1, 4, 4), torch.tensor([-5.0, 2.0])).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
