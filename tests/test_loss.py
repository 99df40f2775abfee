"""The loss family: the reference against analytic truths, and the ops against the reference."""

import math

import pytest
import torch
from helpers import RTOL, assert_close, max_rel_err

from vdm_fast import _ext, ops
from vdm_fast.reference import loss as ref

needs_ext = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="vdm_fast._C not built")
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


def test_decoder_probabilities_sum_to_one_and_peak_at_the_data():
    vocab = 256
    x = torch.randint(0, vocab, (3, 50))
    gamma_0 = torch.tensor([-13.3, -13.3, 2.0], dtype=torch.float64)
    eps = torch.randn(3, 50, dtype=torch.float64)
    z = ref.encode(x, vocab, torch.float64) + torch.exp(0.5 * gamma_0)[:, None] * eps
    probs = torch.softmax(ref.decoder_logits(z, gamma_0, vocab), dim=-1)
    assert_close(probs.sum(-1), torch.ones(3, 50, dtype=torch.float64), 1e-12)
    # At gamma_0 = -13.3 the noise std is 0.0013, a sixth of a bin: the argmax is the data.
    assert torch.equal(ref.decode(z[:2], gamma_0[:2], vocab), x[:2])
    # At high noise the decoder is spread over many values.
    assert probs[2].max(-1).values.max() < 0.5


def test_encode_decode_round_trip_without_noise():
    for vocab in (2, 17, 256):
        x = torch.arange(vocab).reshape(1, -1)
        f = ref.encode(x, vocab, torch.float64)
        assert f.min() > -1 and f.max() < 1
        assert torch.equal(ref.decode(f, torch.tensor([-13.3], dtype=torch.float64), vocab), x)


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
        t, t_s = ref.discretize_time(t, T)
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


def test_antithetic_discretised_times_stay_on_the_grid():
    t, s = ref.discretize_time(torch.tensor([0.0, 1e-6, 0.5, 1.0]), 10)
    assert torch.allclose(t, torch.tensor([0.1, 0.1, 0.5, 1.0]))
    assert torch.allclose(s, t - 0.1) and (s >= 0).all()


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


@needs_ext
@pytest.mark.parametrize("gamma", GAMMAS_0 + [-20.0, 20.0])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (1, 8, 8)])
def test_reconstruction_loss_matches_reference_float64(gamma, shape):
    x, eps, g = _recon_inputs(3, shape, gamma, torch.float64)
    go = torch.randn(3, dtype=torch.float64)
    fused = _recon_with_grads(ops.reconstruction_loss, x, eps, g, go)
    truth = _recon_with_grads(ref.reconstruction_loss, x, eps, g, go)
    for a, b, name in zip(fused, truth, ("loss", "grad eps_0", "grad gamma_0")):
        # atol: at gamma_0 = -13.3 a loss of ~1e-6 nats is the difference of logits of ~10,
        # which the reference itself resolves only to ~1e-15 each.
        assert_close(a, b, 1e-9, name, atol=1e-13 * eps.numel())


@needs_ext
@pytest.mark.parametrize("gamma", GAMMAS_0 + [-20.0, 20.0])
def test_reconstruction_loss_float32_is_as_accurate_as_the_reference(gamma):
    """float32 kernel and float32 reference both against the float64 truth: the kernel's error
    stays within the reference's own (or float32 rounding, whichever is larger)."""
    x, eps, g = _recon_inputs(4, (3, 9, 7), gamma, torch.float32)
    go = torch.randn(4)
    truth = _recon_with_grads(ref.reconstruction_loss, x, eps.double(), g.double(), go.double())
    fused = _recon_with_grads(ops.reconstruction_loss, x, eps, g, go)
    plain = _recon_with_grads(ref.reconstruction_loss, x, eps, g, go)
    for a, b, t, name in zip(fused, plain, truth, ("loss", "grad eps_0", "grad gamma_0")):
        err, ref_err = max_rel_err(a, t), max_rel_err(b, t)
        assert err <= max(2 * ref_err, RTOL[torch.float32]), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


@needs_ext
def test_reconstruction_loss_gradcheck_float64():
    for gamma in GAMMAS_0:
        x, eps, g = _recon_inputs(2, (3, 2), gamma, torch.float64)
        eps.requires_grad_(), g.requires_grad_()
        assert torch.autograd.gradcheck(lambda e, gg: ops.reconstruction_loss(x, e, gg), (eps, g))


@needs_ext
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64,
                                     torch.float16, torch.float32, torch.float64])
def test_reconstruction_loss_accepts_any_integer_valued_dtype(x_dtype):
    x, eps, g = _recon_inputs(2, (4, 5), -5.0, torch.float64, x_dtype=x_dtype)
    assert_close(ops.reconstruction_loss(x, eps, g), ref.reconstruction_loss(x.long(), eps, g), 1e-12)


@needs_ext
def test_reconstruction_loss_non_contiguous_and_small_vocab():
    x, eps, g = _recon_inputs(3, (4, 6), -2.0, torch.float64, vocab=17)
    x_t, eps_t = x.transpose(1, 2), eps.transpose(1, 2)  # non-contiguous views
    go = torch.randn(3, dtype=torch.float64)
    fused = _recon_with_grads(ops.reconstruction_loss, x_t, eps_t, g, go, vocab=17)
    truth = _recon_with_grads(ref.reconstruction_loss, x_t, eps_t, g, go, vocab=17)
    for a, b in zip(fused, truth):
        assert_close(a, b, 1e-10)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reconstruction_kernels_write_every_output(dtype):
    """The raw kernels on NaN-poisoned output buffers: an unwritten element stays NaN."""
    C = _ext._C
    x, eps, g = _recon_inputs(5, (33,), -13.3, dtype)
    out = torch.full((5,), float("nan"), dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    C.recon_forward_cpu(x.data_ptr(), C.XType.int64, eps.data_ptr(), g.data_ptr(), out.data_ptr(),
                        5, 33, 256, name)
    assert_close(out, ref.reconstruction_loss(x, eps, g), RTOL[dtype])
    go = torch.randn(5, dtype=dtype)
    grad_eps = torch.full_like(eps, float("nan"))
    grad_g = torch.full_like(g, float("nan"))
    C.recon_backward_cpu(x.data_ptr(), C.XType.int64, eps.data_ptr(), g.data_ptr(), go.data_ptr(),
                         grad_eps.data_ptr(), grad_g.data_ptr(), 5, 33, 256, name)
    assert torch.isfinite(grad_eps).all() and torch.isfinite(grad_g).all()


@needs_ext
def test_reconstruction_loss_opcheck():
    x, eps, g = _recon_inputs(2, (6,), -5.0, torch.float32)
    torch.library.opcheck(torch.ops.vdm_fast.reconstruction_loss.default,
                          (x, eps.requires_grad_(), g.requires_grad_(), 256))
    torch.library.opcheck(torch.ops.vdm_fast.reconstruction_loss_backward.default,
                          (torch.randn(2), x, eps.detach(), g.detach(), 256))


@needs_ext
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
