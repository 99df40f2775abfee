"""Bad input raises before any kernel runs, with a message naming the argument."""

import pytest
import torch

from vdm_fast import nn as vnn
from vdm_fast import ops

B = 3


def good():
    return dict(x=torch.randint(0, 256, (B, 4)), eps_0=torch.randn(B, 4), gamma_0=torch.randn(B))


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.randint(0, 256, (B, 5))), ValueError, "x must have the shape of eps_0"),
    (dict(x=torch.full((B, 4), 256)), ValueError, r"x must lie in \[0, vocab_size\)"),
    (dict(x=-torch.ones(B, 4, dtype=torch.int64)), ValueError, r"x must lie in \[0, vocab_size\)"),
    (dict(x=torch.full((B, 4), 2.5)), ValueError, "x must be integer-valued"),
    (dict(x=torch.ones(B, 4, dtype=torch.bool)), TypeError, "x must hold integer values"),
    (dict(x=[[1, 2]]), TypeError, "x must be a torch.Tensor"),
    (dict(eps_0=torch.randint(0, 3, (B, 4))), TypeError, "eps_0 must be a floating-point tensor"),
    (dict(gamma_0=torch.randn(B, 4)), ValueError, r"gamma_0 must hold one value per example, shape \(3,\)"),
    (dict(gamma_0=torch.randn(2)), ValueError, "gamma_0 must hold one value per example"),
    (dict(x=torch.zeros(0, 4, dtype=torch.int64), eps_0=torch.randn(0, 4), gamma_0=torch.randn(0)),
     ValueError, "empty batch"),
    (dict(eps_0=torch.randn(())), ValueError, "eps_0 must have a batch dimension"),
])
def test_reconstruction_loss_rejects(change, error, match):
    with pytest.raises(error, match=match):
        ops.reconstruction_loss(**{**good(), **change})


def test_reconstruction_loss_rejects_bad_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size must be in \[2, 65536\]"):
        ops.reconstruction_loss(**good(), vocab_size=1)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        ops.reconstruction_loss(**good(), vocab_size=256.0)


def test_diffusion_losses_reject():
    eps = torch.randn(B, 4)
    with pytest.raises(ValueError, match="eps_hat must have the shape of eps"):
        ops.diffusion_loss(eps, torch.randn(B, 5), torch.rand(B))
    with pytest.raises(ValueError, match="dgamma_dt must hold one value per example"):
        ops.diffusion_loss(eps, eps, torch.rand(B + 1))
    for T in (float("inf"), float("nan")):
        with pytest.raises(TypeError, match="T must be an int"):
            ops.diffusion_loss_discrete(eps, eps, torch.rand(B), torch.rand(B), T)
    with pytest.raises(ValueError, match="T must be > 0"):
        ops.diffusion_loss_discrete(eps, eps, torch.rand(B), torch.rand(B), 0)
    with pytest.raises(ValueError, match="gamma must hold one value per example"):
        ops.diffuse(eps, eps, torch.rand(B, 4))
    with pytest.raises(ValueError, match="gamma_1 must hold one value per example"):
        ops.prior_loss(eps, torch.rand(2))


def test_model_rejects():
    model = vnn.VDM(vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=0), vnn.FixedLinearSchedule(),
                    (1, 4, 4), vocab_size=17)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 4, 4\]"):
        model(torch.randint(0, 17, (2, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"x must lie in \[0, vocab_size\) = \[0, 17\)"):
        model(torch.full((2, 1, 4, 4), 17))
    with pytest.raises(ValueError, match="T must be >= 0"):
        model(torch.randint(0, 17, (2, 1, 4, 4)), T=-1)
    with pytest.raises(ValueError, match="n must be > 0"):
        model.sample(0, T=3)
    with pytest.raises(ValueError, match="image_shape must be"):
        vnn.VDM(model.score_net, vnn.FixedLinearSchedule(), (4, 4))
    with pytest.raises(ValueError, match="attention must be"):
        vnn.ScoreUNet(attention="everywhere")
    with pytest.raises(ValueError, match=r"z must be \[B, 1, H, W\]"):
        model.score_net(torch.randn(2, 3, 4, 4), torch.zeros(2))


@pytest.mark.parametrize("op", ["gamma_nnet", "reconstruction_loss"])
def test_second_derivatives_are_refused_by_name(op):
    """The ops have first derivatives only: create_graph=True through them must fail clearly,
    not warn and hand back zero second derivatives."""
    if op == "gamma_nnet":
        params = [torch.randn(1, 1), torch.randn(1), torch.randn(8, 1), torch.randn(8), torch.randn(1, 8)]
        params = [p.requires_grad_() for p in params]
        out = ops.gamma_nnet(torch.rand(B), *params)[0].sum()
    else:
        params = [good()["eps_0"].requires_grad_()]
        out = ops.reconstruction_loss(good()["x"], params[0], good()["gamma_0"]).sum()
    with pytest.raises(RuntimeError, match=f"vdm_fast::{op}_backward is not differentiable"):
        torch.autograd.grad(out, params, create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(out, params))  # first derivatives still work
