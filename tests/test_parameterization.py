"""The unified view: eps, x, v and score predictions convert exactly into one another and give
the same variational bound, in the reference and in the fused ops."""

import itertools

import pytest
import torch
from helpers import RTOL, assert_close, needs_cpu_kernels

from vdm_fast import ops
from vdm_fast.ops import loss as ops_loss
from vdm_fast.reference import loss as ref
from vdm_fast.diffusion import parameterization as param

KINDS = param.PREDICTIONS


def _state(B=4, shape=(3, 5, 5), dtype=torch.float64):
    x = torch.rand(B, *shape, dtype=dtype) * 2 - 1
    eps = torch.randn(B, *shape, dtype=dtype)
    gamma = torch.linspace(-8.0, 6.0, B, dtype=dtype)
    return x, eps, gamma, ref.diffuse(x, eps, gamma)


@pytest.mark.parametrize("source, target", list(itertools.permutations(KINDS, 2)))
def test_conversions_round_trip(source, target):
    _, _, gamma, z = _state()
    pred = torch.randn_like(z)
    there = param.convert(pred, z, gamma, source, target)
    assert_close(param.convert(there, z, gamma, target, source), pred, 1e-11)


def test_true_values_convert_into_each_other():
    x, eps, gamma, z = _state()
    alpha, sigma = ref.alpha_sigma(gamma[:, None, None, None])
    truth = {"eps": eps, "x": x, "v": alpha * eps - sigma * x, "score": -eps / sigma}
    for kind, value in truth.items():
        assert_close(param.from_eps(eps, z, gamma, kind), value, 1e-12, kind)
        assert_close(param.to_eps(value, z, gamma, kind), eps, 1e-12, kind)


def test_equivalent_predictions_give_the_same_bound():
    x, eps, gamma, z = _state()
    eps_hat = eps + 0.3 * torch.randn_like(eps)
    dgamma = torch.rand(4, dtype=torch.float64) * 20
    expected = ref.diffusion_loss(eps, eps_hat, dgamma)
    for kind in KINDS:
        pred = param.from_eps(eps_hat, z, gamma, kind)
        assert_close(ref.diffusion_loss(eps, pred, dgamma, prediction=kind, x=x, gamma_t=gamma), expected, 1e-10,
                     kind)
    # In x form the continuous bound is -0.5 SNR'(t) ||x - x_hat||^2, with SNR' = -gamma' SNR.
    x_hat = param.from_eps(eps_hat, z, gamma, "x")
    snr_prime = -dgamma * torch.exp(-gamma)
    assert_close(-0.5 * snr_prime * ((x - x_hat) ** 2).sum((1, 2, 3)), expected, 1e-10)


@needs_cpu_kernels
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [0, 10])
def test_fused_losses_take_every_prediction_without_conversion(kind, T, poisoned):
    poisoned(ops_loss)
    x, eps, gamma, z = _state()
    eps_hat = eps + 0.3 * torch.randn_like(eps)
    pred = param.from_eps(eps_hat, z, gamma, kind).detach()
    dgamma, gamma_s = torch.rand(4, dtype=torch.float64) * 20, gamma - 0.5
    go = torch.randn(4, dtype=torch.float64)

    def fused(pred, gamma):
        if T:
            return ops.diffusion_loss_discrete(eps, pred, gamma, gamma_s, T, prediction=kind, x=x)
        return ops.diffusion_loss(eps, pred, dgamma, prediction=kind, x=x, gamma_t=gamma)

    def reference(pred, gamma):
        if T:
            return ref.diffusion_loss_discrete(eps, pred, gamma, gamma_s, T, prediction=kind, x=x)
        return ref.diffusion_loss(eps, pred, dgamma, prediction=kind, x=x, gamma_t=gamma)

    results = []
    for fn in (fused, reference):
        leaves = [pred.clone().requires_grad_(), gamma.clone().requires_grad_()]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, go, allow_unused=True, materialize_grads=True)))
    for a, b, name in zip(*results, ("loss", "grad pred", "grad gamma_t")):
        assert_close(a, b, RTOL[torch.float64] * 100, name)
    assert_close(results[0][0], ref.diffusion_loss_discrete(eps, eps_hat, gamma, gamma_s, T) if T else
                 ref.diffusion_loss(eps, eps_hat, dgamma), 1e-10, "same bound as eps")


@needs_cpu_kernels
def test_fused_v_loss_gradcheck():
    x, eps, gamma, z = _state(B=2, shape=(3,))
    pred = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = gamma.clone().requires_grad_()
    dgamma = torch.rand(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, g: ops.diffusion_loss(eps, p, dgamma, prediction="v", x=x, gamma_t=g), (pred, g))


def test_bad_prediction_arguments():
    x, eps, gamma, _ = _state()
    with pytest.raises(ValueError, match="prediction must be one of"):
        ops.diffusion_loss(eps, eps, gamma, prediction="noise")
    with pytest.raises(ValueError, match="gamma_t is required"):
        ops.diffusion_loss(eps, eps, gamma, prediction="v", x=x)
    with pytest.raises(ValueError, match="x .* is required"):
        ops.diffusion_loss(eps, eps, gamma, prediction="x", gamma_t=gamma)
