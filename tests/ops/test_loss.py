"""The loss family (``diffuse``, ``diffusion_loss(_discrete)`` for every prediction, ``prior_loss``,
``reconstruction_loss``, ``vlb_terms``, ``encode``): the reference against analytic truths, the ops
and the kernels against the reference, bad input refused by name, hostile values, opcheck and
torch.compile."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import RTOL, assert_close, diffused_batch, max_rel_err, requires_cuda, needs_cpu_kernels

from vdm_fast import ops
from vdm_fast.ops import loss as ops_loss
from vdm_fast.reference import loss as ref
from vdm_fast.diffusion import parameterization as param
from vdm_fast.diffusion import times as ref_times

GAMMAS_0 = [-13.3, -5.0, 0.0, 5.0]


# --- the reference against analytic truths ---------------------------------------------------

def test_prior_loss_equals_torch_distributions_kl():
    f = torch.rand(4, 3, 5, 5, dtype=torch.float64) * 2 - 1
    gamma_1 = torch.randn(4, dtype=torch.float64) * 2 + 4
    alpha, sigma = ref.alpha_sigma(gamma_1[:, None, None, None])
    q = torch.distributions.Normal(alpha * f, sigma.expand_as(f))
    p = torch.distributions.Normal(torch.zeros_like(f), torch.ones_like(f))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert_close(ref.prior_loss(f, gamma_1), expected, 1e-12)


def _gaussian_vlb_terms(n, dims, s, gamma_min=-13.3, gamma_max=5.0, T=0):
    """Per-sample (nll, vlb) for data x ~ N(0, s^2 I) under the exact denoiser, fixed schedule.

    The exact denoiser is E[eps | z_t] = sigma_t z_t / (alpha_t^2 s^2 + sigma_t^2); the decoder
    is the Gaussian p(x | z_0) = N(z_0 / alpha_0, sigma_0^2 / alpha_0^2).
    """
    dt = torch.float64
    x = torch.randn(n, dims, dtype=dt) * s
    t = (torch.rand((), dtype=dt) + torch.arange(n, dtype=dt) / n) % 1.0
    slope = gamma_max - gamma_min

    def gamma(u):
        return gamma_min + slope * u

    eps = torch.randn(n, dims, dtype=dt)
    if T:
        t, t_s = ref_times.discretize_time(t, T)
    z = ref.diffuse(x, eps, gamma(t))
    alpha, sigma = ref.alpha_sigma(gamma(t))
    eps_hat = (sigma / (alpha**2 * s**2 + sigma**2))[:, None] * z
    if T:
        diffusion = ref.diffusion_loss_discrete(eps, eps_hat, gamma(t), gamma(t_s), T)
    else:
        diffusion = ref.diffusion_loss(eps, eps_hat, torch.full((n,), slope, dtype=dt))
    prior = ref.prior_loss(x, torch.full((n,), gamma_max, dtype=dt))
    g0 = torch.tensor(gamma_min, dtype=dt)
    a0, s0 = ref.alpha_sigma(g0)
    eps_0 = torch.randn(n, dims, dtype=dt)
    recon = (0.5 * torch.log(2 * math.pi * s0**2 / a0**2) + 0.5 * eps_0**2).sum(1)
    nll = (0.5 * math.log(2 * math.pi * s**2) + 0.5 * (x / s) ** 2).sum(1)
    return nll, recon + prior + diffusion


def test_continuous_vlb_of_gaussian_data_with_exact_denoiser_is_the_nll():
    nll, vlb = _gaussian_vlb_terms(n=2_000_000, dims=2, s=0.5)
    # The bound is tight up to the endpoints (O(alpha_1^2) and O(sigma_0^2 / s^2) per dim).
    gap = (vlb - nll).mean()
    stderr = (vlb - nll).std() / math.sqrt(len(vlb))
    assert abs(gap) < 4 * stderr + 1e-3, f"gap {gap:.4g} nats, stderr {stderr:.3g}"
    assert stderr < 0.015  # the estimate pins the NLL (1.45 nats) to within 4 %


def test_discrete_time_loss_approaches_continuous_time():
    torch.manual_seed(1)
    _, cont = _gaussian_vlb_terms(n=200_000, dims=2, s=0.5)
    gaps = []
    for T in (2, 10, 1000):
        torch.manual_seed(1)
        _, disc = _gaussian_vlb_terms(n=200_000, dims=2, s=0.5, T=T)
        gaps.append((disc - cont).mean().item())
    # Fewer steps: a looser bound; many steps: the continuous-time bound.
    assert gaps[0] > gaps[1] > 0.0
    assert abs(gaps[2]) < 0.02 * abs(gaps[0])


KINDS = param.PREDICTIONS


def test_equivalent_predictions_give_the_same_bound():
    x, eps, gamma, z = diffused_batch()
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


# --- ops against the reference ----------------------------------------------------------------

def _recon_inputs(B, shape, gamma, dtype, x_dtype=torch.int64, vocab=256):
    x = torch.randint(0, vocab, (B, *shape)).to(x_dtype)
    eps = torch.randn(B, *shape, dtype=dtype)
    g = (torch.full((B,), gamma, dtype=torch.float64) + 0.1 * torch.randn(B, dtype=torch.float64)).to(dtype)
    return x, eps, g


def _recon_with_grads(fn, x, eps, g, grad_out, vocab=256):
    eps, g = eps.detach().requires_grad_(), g.detach().requires_grad_()
    loss = fn(x, eps, g, vocab)
    return (loss, *torch.autograd.grad(loss, (eps, g), grad_out))


@needs_cpu_kernels
@pytest.mark.parametrize("gamma", GAMMAS_0 + [-20.0, 20.0])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (1, 8, 8)])
def test_reconstruction_loss_matches_reference_float64(gamma, shape, poisoned):
    poisoned(ops_loss)
    x, eps, g = _recon_inputs(3, shape, gamma, torch.float64)
    go = torch.randn(3, dtype=torch.float64)
    fused = _recon_with_grads(ops.reconstruction_loss, x, eps, g, go)
    truth = _recon_with_grads(ref.reconstruction_loss, x, eps, g, go)
    for a, b, name in zip(fused, truth, ("loss", "grad eps_0", "grad gamma_0")):
        # atol: at gamma_0 = -13.3 a loss of ~1e-6 nats is the difference of logits of ~10,
        # which the reference itself resolves only to ~1e-15 each.
        assert_close(a, b, 1e-9, name, atol=1e-13 * eps.numel())


@needs_cpu_kernels
@pytest.mark.parametrize("gamma", GAMMAS_0 + [-20.0, 20.0])
def test_reconstruction_loss_float32_is_as_accurate_as_the_reference(gamma, poisoned):
    """float32 kernel and float32 reference both against the float64 truth: the kernel's error
    stays within the reference's own (or float32 rounding, whichever is larger)."""
    poisoned(ops_loss)
    x, eps, g = _recon_inputs(4, (3, 9, 7), gamma, torch.float32)
    go = torch.randn(4)
    truth = _recon_with_grads(ref.reconstruction_loss, x, eps.double(), g.double(), go.double())
    fused = _recon_with_grads(ops.reconstruction_loss, x, eps, g, go)
    plain = _recon_with_grads(ref.reconstruction_loss, x, eps, g, go)
    for a, b, t, name in zip(fused, plain, truth, ("loss", "grad eps_0", "grad gamma_0")):
        err, ref_err = max_rel_err(a, t), max_rel_err(b, t)
        assert err <= max(2 * ref_err, RTOL[torch.float32]), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


@needs_cpu_kernels
def test_reconstruction_loss_gradcheck_float64():
    for gamma in GAMMAS_0:
        x, eps, g = _recon_inputs(2, (3, 2), gamma, torch.float64)
        eps.requires_grad_(), g.requires_grad_()
        assert torch.autograd.gradcheck(lambda e, gg: ops.reconstruction_loss(x, e, gg), (eps, g))


@needs_cpu_kernels
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64,
                                     torch.float16, torch.float32, torch.float64])
def test_reconstruction_loss_accepts_any_integer_valued_dtype(x_dtype):
    x, eps, g = _recon_inputs(2, (4, 5), -5.0, torch.float64, x_dtype=x_dtype)
    assert_close(ops.reconstruction_loss(x, eps, g), ref.reconstruction_loss(x.long(), eps, g), 1e-12)


@needs_cpu_kernels
def test_reconstruction_loss_non_contiguous_and_small_vocab():
    x, eps, g = _recon_inputs(3, (4, 6), -2.0, torch.float64, vocab=17)
    x_t, eps_t = x.transpose(1, 2), eps.transpose(1, 2)  # non-contiguous views
    go = torch.randn(3, dtype=torch.float64)
    fused = _recon_with_grads(ops.reconstruction_loss, x_t, eps_t, g, go, vocab=17)
    truth = _recon_with_grads(ref.reconstruction_loss, x_t, eps_t, g, go, vocab=17)
    for a, b in zip(fused, truth):
        assert_close(a, b, 1e-10)


@needs_cpu_kernels
def test_reconstruction_loss_opcheck():
    x, eps, g = _recon_inputs(2, (6,), -5.0, torch.float32)
    torch.library.opcheck(torch.ops.vdm_fast.reconstruction_loss.default,
                          (x, eps.requires_grad_(), g.requires_grad_(), 256))
    torch.library.opcheck(torch.ops.vdm_fast.reconstruction_loss_backward.default,
                          (torch.randn(2), x, eps.detach(), g.detach(), 256))


@needs_cpu_kernels
def test_reconstruction_loss_under_torch_compile_fullgraph():
    x, eps, g = _recon_inputs(2, (3, 4, 4), -5.0, torch.float32)

    def step(eps, g):
        return ops.reconstruction_loss(x, eps, g).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    e1, g1 = eps.clone().requires_grad_(), g.clone().requires_grad_()
    e2, g2 = eps.clone().requires_grad_(), g.clone().requires_grad_()
    compiled(e1, g1).backward()
    step(e2, g2).backward()
    assert_close(e1.grad, e2.grad, 1e-6)
    assert_close(g1.grad, g2.grad, 1e-6)


@pytest.mark.parametrize("eps_hat_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_diffusion_losses_match_reference(eps_hat_dtype):
    eps = torch.randn(4, 3, 5, 5)
    eps_hat = (eps + 0.3 * torch.randn_like(eps)).to(eps_hat_dtype)
    dgamma = torch.rand(4) * 20
    expected = ref.diffusion_loss(eps.double(), eps_hat.double(), dgamma.double())
    assert_close(ops.diffusion_loss(eps, eps_hat, dgamma), expected, RTOL[torch.float32])
    g_t, g_s = torch.randn(4), torch.randn(4) - 1
    expected = ref.diffusion_loss_discrete(eps.double(), eps_hat.double(), g_t.double(), g_s.double(), 100)
    assert_close(ops.diffusion_loss_discrete(eps, eps_hat, g_t, g_s, 100), expected, RTOL[torch.float32])


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    wrt = [t for t in inputs if t.requires_grad]
    return (out, *torch.autograd.grad(out, wrt, grad_out))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5, 7), (5, 1027)])
@pytest.mark.parametrize("gamma_scale", [1.0, 20.0])
def test_diffuse_matches_reference(dtype, shape, gamma_scale, poisoned):
    poisoned(ops_loss)
    B = shape[0]
    f, eps = torch.rand(shape, dtype=dtype) * 2 - 1, torch.randn(shape, dtype=dtype)
    gamma = torch.randn(B, dtype=dtype) * gamma_scale
    go = torch.randn(shape, dtype=dtype)
    fused = _grads(ops.diffuse, (f, eps, gamma), go)
    truth = _grads(ref.diffuse, (f.double(), eps.double(), gamma.double()), go.double())
    for a, b, name in zip(fused, truth, ("z", "grad f", "grad eps", "grad gamma")):
        assert_close(a, b, RTOL[dtype] * 10, name)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 3, 5, 7), (2, 5000)])
def test_diffusion_and_prior_losses_match_reference(dtype, shape, poisoned):
    poisoned(ops_loss)
    B = shape[0]
    eps = torch.randn(shape, dtype=dtype)
    eps_hat = eps + 0.3 * torch.randn(shape, dtype=dtype)
    f = torch.rand(shape, dtype=dtype) * 2 - 1
    dgamma, g_t, g_s, g_1 = (torch.rand(B, dtype=dtype) * 20, torch.randn(B, dtype=dtype),
                             torch.randn(B, dtype=dtype) - 1, torch.randn(B, dtype=dtype) * 5)
    go = torch.randn(B, dtype=dtype)
    cases = [
        (ops.diffusion_loss, ref.diffusion_loss, (eps, eps_hat, dgamma)),
        (lambda *a: ops.diffusion_loss_discrete(*a, 7), lambda *a: ref.diffusion_loss_discrete(*a, 7),
         (eps, eps_hat, g_t, g_s)),
        (ops.prior_loss, ref.prior_loss, (f, g_1)),
    ]
    for fused_fn, ref_fn, inputs in cases:
        fused = _grads(fused_fn, inputs, go)
        truth = _grads(ref_fn, [t.double() for t in inputs], go.double())
        for a, b in zip(fused, truth):
            assert_close(a, b, RTOL[dtype] * 10)


@needs_cpu_kernels
def test_fused_ops_gradcheck_float64():
    f, eps = torch.rand(2, 5, dtype=torch.float64) * 2 - 1, torch.randn(2, 5, dtype=torch.float64)
    eps_hat = torch.randn(2, 5, dtype=torch.float64)
    gamma = torch.randn(2, dtype=torch.float64) * 3
    args = [t.requires_grad_() for t in (f, eps, eps_hat, gamma)]
    assert torch.autograd.gradcheck(lambda f, e, g: ops.diffuse(f, e, g), (args[0], args[1], args[3]))
    assert torch.autograd.gradcheck(lambda e, eh, g: ops.diffusion_loss(e, eh, g), (args[1], args[2], args[3]))
    assert torch.autograd.gradcheck(lambda f, g: ops.prior_loss(f, g), (args[0], args[3]))


@needs_cpu_kernels
def test_all_loss_ops_pass_opcheck():
    f, eps, gamma = torch.rand(2, 6) * 2 - 1, torch.randn(2, 6), torch.randn(2)
    ops_ = torch.ops.vdm_fast
    torch.library.opcheck(ops_.diffuse.default, (f.requires_grad_(), eps.requires_grad_(), gamma.requires_grad_()))
    torch.library.opcheck(ops_.diffuse_backward.default, (torch.randn(2, 6), f.detach(), eps.detach(), gamma.detach()))
    pred = torch.randn(2, 6, requires_grad=True)
    a, c = torch.rand(2, requires_grad=True), torch.rand(2, requires_grad=True)
    torch.library.opcheck(ops_.sum_squared_error.default, (pred, eps.detach(), None, None, None))
    torch.library.opcheck(ops_.sum_squared_error.default, (pred, None, None, None, None))
    torch.library.opcheck(ops_.sum_squared_error.default, (pred, eps.detach(), a, f.detach(), c))
    torch.library.opcheck(ops_.sum_squared_error_backward.default,
                          (torch.randn(2), f.detach(), eps.detach(), a.detach(), f.detach(), c.detach()))


@needs_cpu_kernels
def test_vlb_terms_under_torch_compile_fullgraph_matches_eager():
    x = torch.randint(0, 256, (2, 3, 4, 4))
    eps, eps_0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    g = torch.tensor([-1.0, 2.0])

    def step(eps_hat, g):
        terms = ops.vlb_terms(x, eps, eps_hat, eps_0, g, g - 5, g + 5, dgamma_dt=g.exp())
        return terms.bpd.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (eps + 0.1, g)]
    b = [t.clone().requires_grad_() for t in (eps + 0.1, g)]
    assert_close(compiled(*a), step(*b), 1e-6)
    compiled(*a).backward()
    step(*b).backward()
    for u, v in zip(a, b):
        assert_close(u.grad, v.grad, 1e-6)


@needs_cpu_kernels
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [0, 10])
def test_fused_losses_take_every_prediction_without_conversion(kind, T, poisoned):
    poisoned(ops_loss)
    x, eps, gamma, z = diffused_batch()
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
    x, eps, gamma, z = diffused_batch(B=2, shape=(3,))
    pred = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = gamma.clone().requires_grad_()
    dgamma = torch.rand(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, g: ops.diffusion_loss(eps, p, dgamma, prediction="v", x=x, gamma_t=g), (pred, g))


# --- bad input: refused before any kernel runs, with a message naming the argument ------------

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


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_wide_images_are_refused_by_name(dtype):
    x = torch.randint(0, 256, (2, 6)).to(dtype)
    with pytest.raises(TypeError, match="x must hold integer values.*convert with x.long"):
        ops.reconstruction_loss(x, torch.randn(2, 6), torch.full((2,), -5.0))


def test_a_huge_vocabulary_is_refused_by_name():
    with pytest.raises(ValueError, match=r"vocab_size must be in \[2, 65536\]"):
        ops.reconstruction_loss(torch.zeros(2, 6, dtype=torch.long), torch.randn(2, 6), torch.zeros(2),
                                vocab_size=2**31)


def test_float_images_get_a_conversion_hint():
    img = torch.rand(2, 6)
    with pytest.raises(ValueError, match=r"\(img \* 255\).round\(\)"):
        ops.reconstruction_loss(img, torch.randn(2, 6), torch.zeros(2))


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


def test_bad_prediction_arguments():
    x, eps, gamma, _ = diffused_batch()
    with pytest.raises(ValueError, match="prediction must be one of"):
        ops.diffusion_loss(eps, eps, gamma, prediction="noise")
    with pytest.raises(ValueError, match="gamma_t is required"):
        ops.diffusion_loss(eps, eps, gamma, prediction="v", x=x)
    with pytest.raises(ValueError, match="x .* is required"):
        ops.diffusion_loss(eps, eps, gamma, prediction="x", gamma_t=gamma)


def test_vlb_terms_discrete_needs_gamma_s():
    x, e = torch.randint(0, 256, (2, 4)), torch.randn(2, 4)
    g = torch.zeros(2)
    with pytest.raises(ValueError, match="gamma_s is required"):
        ops.vlb_terms(x, e, e, e, g, g, g, T=10)
    with pytest.raises(ValueError, match="dgamma_dt is required"):
        ops.vlb_terms(x, e, e, e, g, g, g)


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


# --- hostile values: an error, or NaN, never a plausible wrong number, never a dead process ---

@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("bad", [300, -1, 2.5, float("nan")])
def test_invalid_images_give_nan_where_checks_cannot_run(use_backend, backend, bad):
    """Inside torch.compile the value checks are skipped (they would need a host sync): the
    kernels and the reference then make the example's loss and gradient NaN."""
    use_backend(backend)
    x = torch.randint(0, 256, (3, 10)).double()
    x[1, 4] = bad
    eps = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    gamma = torch.full((3,), -6.0, dtype=torch.float64)
    with pytest.raises(ValueError):  # eager: refused
        ops.reconstruction_loss(x, eps, gamma)
    torch._dynamo.reset()
    compiled = torch.compile(ops.reconstruction_loss, backend="aot_eager", fullgraph=True)
    loss = compiled(x, eps, gamma)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(eps.grad[1]).any() and torch.isfinite(eps.grad[[0, 2]]).all()
    torch._dynamo.reset()


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, cwd="/")


@needs_cpu_kernels
def test_a_nan_gamma_makes_its_example_nan_and_leaves_the_process_alive():
    """A NaN gamma_0 ended the interpreter (std::length_error thrown inside an OpenMP region,
    exit 134): now that example's loss and gradients are NaN and the others are unchanged."""
    proc = _run("""
        import torch
        from vdm_fast import ops
        torch.manual_seed(0)
        x = torch.randint(0, 256, (3, 40)); eps = torch.randn(3, 40, requires_grad=True)
        g = torch.tensor([float("nan"), -5.0, float("inf")], requires_grad=True)
        loss = ops.reconstruction_loss(x, eps, g)
        loss.sum().backward()
        clean = ops.reconstruction_loss(x, eps.detach(), torch.full((3,), -5.0))
        print(torch.isnan(loss[0]).item(), torch.equal(loss[1], clean[1]), torch.isnan(g.grad[0]).item(),
              torch.isfinite(eps.grad[1]).all().item())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True", "True"], proc.stdout


@needs_cpu_kernels
def test_random_extremes_never_end_the_process():
    """NaN, inf, 1e30 and subnormals in the data, gammas and weights of every loss op."""
    proc = _run("""
        import torch
        from vdm_fast import ops
        gen = torch.Generator().manual_seed(0)
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-40, 0.0, -0.0])
        def hostile(*shape):
            t = torch.randn(*shape, generator=gen)
            idx = torch.randint(0, t.numel(), (max(1, t.numel() // 4),), generator=gen)
            t.view(-1)[idx] = special[torch.randint(0, len(special), idx.shape, generator=gen)]
            return t
        for trial in range(40):
            B = 1 + trial % 4
            x = torch.randint(0, 256, (B, 3, 4, 4), generator=gen)
            eps, pred, eps_0 = (hostile(B, 3, 4, 4).requires_grad_() for _ in range(3))
            g = [hostile(B).requires_grad_() for _ in range(4)]
            T = trial % 2 * 10
            terms = ops.vlb_terms(x, eps, pred, eps_0, g[0], g[1], g[2], dgamma_dt=g[3], gamma_s=g[3], T=T)
            terms.bpd.sum().backward()
            ops.reconstruction_loss(x, eps_0, g[1]).sum().backward()
            ops.diffuse(ops.encode(x), eps, g[0]).sum().backward()
        print("survived")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "survived", (proc.returncode, proc.stderr[-3000:])


@needs_cpu_kernels
@pytest.mark.parametrize("gamma_0", [-100.0, -88.0, -60.0, 20.0])
def test_extreme_gamma_0_in_float32_gives_the_float64_answer(gamma_0):
    """exp(-gamma_0) overflows float32 below about -88 (sigma_0 = e^-50 at -100: the decoder is
    exact, the loss 0): the kernels keep the per-example constants in double."""
    x = torch.randint(0, 256, (3, 2, 5, 5))
    eps = torch.randn(3, 2, 5, 5)
    results = {}
    for dtype in (torch.float32, torch.float64):
        e = eps.to(dtype).clone().requires_grad_()
        g = torch.full((3,), gamma_0, dtype=dtype, requires_grad=True)
        loss = ops.reconstruction_loss(x, e, g)
        loss.sum().backward()
        results[dtype] = [t.detach().double() for t in (loss, e.grad, g.grad)]
    truth = [t.detach() for t in results[torch.float64]]
    reference = ref.reconstruction_loss(x, eps.double(), torch.full((3,), gamma_0, dtype=torch.float64))
    assert torch.allclose(truth[0], reference, rtol=1e-9, atol=1e-12)
    for got, want in zip(results[torch.float32], truth):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-30


# --- Triton kernels (interpreted on the CPU where no GPU exists) ------------------------------

triton_loss = pytest.importorskip("vdm_fast.kernels.loss", reason="triton is not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, D", [(1, 1), (2, 1500)])  # one partial chunk; several, the last ragged
def test_triton_diffuse_and_sse_match_reference(dtype, B, D, poisoned):
    poisoned(triton_loss)
    f, eps = torch.rand(B, D, dtype=dtype) * 2 - 1, torch.randn(B, D, dtype=dtype)
    gamma = torch.randn(B, dtype=dtype) * 8
    go = torch.randn(B, D, dtype=dtype)
    truth = _grads(ref.diffuse, (f, eps, gamma), go)
    assert_close(triton_loss.diffuse_forward(f, eps, gamma), truth[0], RTOL[dtype])
    for a, b in zip(triton_loss.diffuse_backward(go, f, eps, gamma), truth[1:]):
        assert_close(a, b, RTOL[dtype] * 10)
    assert_close(triton_loss.sse_forward(f, eps), ((f - eps) ** 2).sum(1), RTOL[dtype])
    assert_close(triton_loss.sse_forward(f), (f**2).sum(1), RTOL[dtype])
    gb = torch.randn(B, dtype=dtype)
    assert_close(triton_loss.sse_backward(gb, f, eps)[0], 2 * gb[:, None] * (f - eps), RTOL[dtype])
    # With per-example coefficients: the residual x - a y - c w, and the coefficients' gradients.
    a, c, w = torch.randn(B, dtype=dtype), torch.randn(B, dtype=dtype), torch.randn(B, D, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (f, a, c)]
    r = leaves[0] - leaves[1][:, None] * eps - leaves[2][:, None] * w
    truth = r.square().sum(1)
    grads = torch.autograd.grad(truth, leaves, gb)
    assert_close(triton_loss.sse_forward(f, eps, a, w, c), truth, RTOL[dtype])
    for got, want in zip(triton_loss.sse_backward(gb, f, eps, a, w, c), grads):
        assert_close(got, want, RTOL[dtype] * 10)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_triton_sse_reads_low_precision_eps_hat(low, poisoned):
    poisoned(triton_loss)
    eps = torch.randn(2, 700)
    eps_hat = (eps + 0.2 * torch.randn_like(eps)).to(low)
    expected = ((eps_hat.double() - eps.double()) ** 2).sum(1)
    assert_close(triton_loss.sse_forward(eps_hat, eps), expected, RTOL[torch.float32])
    grad = triton_loss.sse_backward(torch.ones(2), eps_hat, eps)[0]
    assert grad.dtype == low
    assert_close(grad, 2 * (eps_hat.double() - eps.double()), RTOL[low])


@pytest.mark.parametrize("gamma", GAMMAS_0 + [-20.0, 20.0])
def test_triton_reconstruction_loss_matches_reference(gamma, poisoned):
    poisoned(triton_loss)
    x, eps, g = _recon_inputs(2, (1100,), gamma, torch.float64, x_dtype=torch.uint8)
    go = torch.randn(2, dtype=torch.float64)
    truth = _recon_with_grads(ref.reconstruction_loss, x, eps, g, go)
    fused = (triton_loss.recon_forward(x, eps, g, 256), *triton_loss.recon_backward(go, x, eps, g, 256))
    for a, b, name in zip(fused, truth, ("loss", "grad eps_0", "grad gamma_0")):
        assert_close(a, b, 1e-9, name, atol=1e-13 * eps.numel())
    # float32, against the float64 truth, as accurate as the float32 reference.
    e32, g32, go32 = eps.float(), g.float(), go.float()
    fused = (triton_loss.recon_forward(x, e32, g32, 256), *triton_loss.recon_backward(go32, x, e32, g32, 256))
    plain = _recon_with_grads(ref.reconstruction_loss, x, e32, g32, go32)
    for a, p, t, name in zip(fused, plain, truth, ("loss", "grad eps_0", "grad gamma_0")):
        err, ref_err = max_rel_err(a, t), max_rel_err(p, t)
        assert err <= max(2 * ref_err, RTOL[torch.float32]), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


def test_the_triton_reconstruction_kernels_take_the_same_extremes():
    """The Triton kernels (interpreted here) keep the per-example constants in float64 too, and a
    NaN gamma makes only its own example NaN."""
    kernels = pytest.importorskip("vdm_fast.kernels.loss", reason="triton is not installed")
    x = torch.randint(0, 256, (4, 150), dtype=torch.uint8)
    eps = torch.randn(4, 150, dtype=torch.float64)
    gamma = torch.tensor([-100.0, -88.0, 20.0, -5.0], dtype=torch.float64)
    go = torch.randn(4, dtype=torch.float64)
    truth = (kernels.recon_forward(x, eps, gamma, 256), *kernels.recon_backward(go, x, eps, gamma, 256))
    expected = ref.reconstruction_loss(x, eps, gamma)
    assert torch.allclose(truth[0], expected, rtol=1e-9, atol=1e-9)
    e32, g32, go32 = eps.float(), gamma.float(), go.float()
    got = (kernels.recon_forward(x, e32, g32, 256), *kernels.recon_backward(go32, x, e32, g32, 256))
    for a, b in zip(got, truth):
        assert torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max() + 1e-30
    g_nan = g32.clone()
    g_nan[1] = float("nan")
    loss = kernels.recon_forward(x, e32, g_nan, 256)
    grad_eps, grad_gamma = kernels.recon_backward(go32, x, e32, g_nan, 256)
    assert torch.isnan(loss[1]) and torch.isnan(grad_gamma[1]) and torch.isnan(grad_eps[1]).any()
    keep = [0, 2, 3]
    assert torch.equal(loss[keep], got[0][keep]) and torch.equal(grad_gamma[keep], got[2][keep])


# --- CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs them) ----------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gamma", GAMMAS_0 + [-20.0, 20.0])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 5, 7)])
def test_cuda_loss_ops_match_reference(gamma, shape, poisoned):
    poisoned(ops_loss)
    poisoned(triton_loss)
    B = 6
    x, eps, g = _recon_inputs(B, shape, gamma, torch.float64, x_dtype=torch.uint8)
    go = torch.randn(B, dtype=torch.float64)
    truth = _recon_with_grads(ref.reconstruction_loss, x, eps, g, go)
    for dtype in (torch.float64, torch.float32):
        fused = _recon_with_grads(ops.reconstruction_loss, x.cuda(), eps.to("cuda", dtype), g.to("cuda", dtype),
                                  go.to("cuda", dtype))
        plain = _recon_with_grads(ref.reconstruction_loss, x, eps.to(dtype), g.to(dtype), go.to(dtype))
        for a, p, t in zip(fused, plain, truth):
            if dtype == torch.float64:
                assert_close(a.cpu(), t, 1e-9, atol=1e-13 * eps.numel())
            else:  # as accurate as the float32 reference, against the float64 truth
                assert max_rel_err(a.cpu(), t) <= max(2 * max_rel_err(p, t), RTOL[dtype])
    f, e = torch.rand(B, *shape) * 2 - 1, torch.randn(B, *shape)
    gt = torch.randn(B) * 5
    go = torch.randn(B, *shape)
    truth = _grads(ref.diffuse, (f.double(), e.double(), gt.double()), go.double())
    for a, b in zip(_grads(ops.diffuse, (f.cuda(), e.cuda(), gt.cuda()), go.cuda()), truth):
        assert_close(a.cpu(), b, RTOL[torch.float32] * 10)
    for low in (torch.float32, torch.bfloat16):
        eh = (e + 0.1 * torch.randn_like(e)).to(low)
        dg = torch.rand(B) * 20
        truth = _grads(ref.diffusion_loss, (e.double(), eh.double(), dg.double()), torch.ones(B, dtype=torch.float64))
        fused = _grads(ops.diffusion_loss, (e.cuda(), eh.cuda(), dg.cuda()), torch.ones(B, device="cuda"))
        for a, b in zip(fused, truth):
            assert_close(a.cpu(), b, RTOL[low] if a.dtype == low else RTOL[torch.float32] * 10)


# --- gamma in any shape that broadcasts to the batch, and the dtype rule ------------------------

def _gamma_forms(values: torch.Tensor):
    """``values [B]`` as other code holds it: ``[B]``, ``[B, 1, 1, 1]``; and, when all equal, a
    Python number, a 0-d tensor and ``[1]``."""
    B = values.shape[0]
    forms = {"[B]": values.clone(), "[B,1,1,1]": values.reshape(B, 1, 1, 1).clone()}
    if torch.all(values == values[0]):
        forms.update({"number": values[0].item(), "0-d": values[0].clone(), "[1]": values[:1].clone()})
    return forms


@pytest.mark.parametrize("op", ["diffuse", "diffusion_loss", "diffusion_loss_v", "discrete", "prior", "recon"])
def test_every_gamma_argument_takes_any_shape_that_broadcasts_to_the_batch(op):
    B = 3
    x = torch.randint(0, 256, (B, 2, 4, 4))
    f = ops.encode(x)
    eps, pred, eps_0 = (torch.randn(B, 2, 4, 4) for _ in range(3))
    shared = torch.full((B,), -4.5)  # one value for the batch: every form applies
    calls = {
        "diffuse": lambda g: ops.diffuse(f, eps, g),
        "diffusion_loss": lambda g: ops.diffusion_loss(eps, pred, g),
        "diffusion_loss_v": lambda g: ops.diffusion_loss(eps, pred, torch.ones(B), prediction="v", x=f, gamma_t=g),
        "discrete": lambda g: ops.diffusion_loss_discrete(eps, pred, torch.full((B,), -2.0), g, 10),
        "prior": lambda g: ops.prior_loss(f, g),
        "recon": lambda g: ops.reconstruction_loss(x, eps_0, g),
    }
    for values in (shared, torch.tensor([-6.0, -4.5, -3.0])):
        expected = calls[op](values)
        for form, gamma in _gamma_forms(values).items():
            if isinstance(gamma, torch.Tensor):
                gamma.requires_grad_(True)
            out = calls[op](gamma)
            assert_close(out, expected, 1e-6, f"{op}, gamma as {form}")
            if isinstance(gamma, torch.Tensor):  # gradients come back in the caller's shape
                out.sum().backward()
                leaf = values.clone().requires_grad_(True)
                calls[op](leaf).sum().backward()
                assert gamma.grad.shape == gamma.shape
                assert_close(gamma.grad.sum(), leaf.grad.sum(), 1e-5, f"{op}, gradient of gamma as {form}")
    with pytest.raises(ValueError, match="one value per example"):
        calls[op](torch.zeros(B, 4))


def test_a_float64_gamma_never_promotes_float32_data():
    B = 2
    f, eps, pred = (torch.randn(B, 8) for _ in range(3))
    g = torch.randn(B, dtype=torch.float64)
    assert ops.diffuse(f, eps, g).dtype == torch.float32
    assert ops.diffusion_loss(eps, pred, g.exp()).dtype == torch.float32
    assert ops.prior_loss(f, g).dtype == torch.float32
    assert ops.reconstruction_loss(torch.randint(0, 256, (B, 8)), eps, g - 5).dtype == torch.float32
    assert ops.diffuse(f.double(), eps.double(), g.float()).dtype == torch.float64


def test_encode_is_exported_and_refuses_float_images_with_the_conversion():
    x = torch.randint(0, 256, (2, 5))
    assert torch.equal(ops.encode(x), (2 * x.float() + 1) / 256 - 1)
    with pytest.raises(ValueError, match=r"\(img \* 255\).round\(\)"):
        ops.encode(torch.rand(2, 5))
