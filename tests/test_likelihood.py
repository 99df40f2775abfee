"""The probability-flow ODE likelihood (vdm_fast.likelihood) against a model whose ODE density is
known in closed form: Gaussian data with the Bayes-optimal denoiser, under three schedules (fixed
linear, the learned monotone network, and another library's gamma(t) through autograd).

For x ~ N(mu, S) with S = Q diag(s^2) Q^T, the marginal of z_t is N(alpha_t mu, V_t) with V_t =
alpha_t^2 S + sigma_t^2 I = Q diag(v_t) Q^T, and E[eps | z_t] = sigma_t V_t^-1 (z_t - alpha_t mu).
With that denoiser the probability-flow ODE is the affine map
z_1 = alpha_1 mu + Q diag(sqrt(v_1 / v_0)) Q^T (z_0 - alpha_0 mu), its divergence integral is
0.5 sum_d log(v_1d / v_0d), and so log p_ODE(z_0) = log N(z_1; 0, I) + 0.5 sum_d log(v_1d / v_0d).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vdm_fast import likelihood
from vdm_fast import nn as vnn
from vdm_fast.diffusion.pixels import encode

pytest.importorskip("torchdiffeq")

SHAPE = (1, 2, 4)
D = 8
# |log p_ODE - closed form| in nats (the 8 dims together; the densities are -20 to -150 nats),
# float64, dopri5 at rtol = atol = 1e-10: measured at most 3.5e-7 over the three schedules; and
# at rtol = atol = 1e-6: at most 2.1e-3.
CLOSED_FORM_TOL = {1e-10: 1e-5, 1e-6: 1e-2}


class GaussianDenoiser(nn.Module):
    """``E[eps | z_t]`` for ``x ~ N(mu, Q diag(s2) Q^T)``: the Bayes-optimal noise prediction."""

    def __init__(self, mu, q, s2):
        super().__init__()
        self.mu = nn.Parameter(mu)  # float64: the VDM's dtype
        self.register_buffer("q", q)
        self.register_buffer("s2", s2)

    def variances(self, gamma):
        return torch.sigmoid(-gamma)[:, None] * self.s2 + torch.sigmoid(gamma)[:, None]

    def forward(self, z, gamma):
        B = z.shape[0]
        alpha = torch.sqrt(torch.sigmoid(-gamma))[:, None]
        sigma = torch.sqrt(torch.sigmoid(gamma))[:, None]
        u = (z.reshape(B, -1) - alpha * self.mu) @ self.q
        return ((sigma * u / self.variances(gamma)) @ self.q.T).reshape(z.shape)


def _schedule(kind):
    if kind == "fixed":
        return vnn.FixedLinearSchedule(-6.0, 5.0)
    if kind == "nnet":
        s = vnn.MonotoneNetSchedule(-6.0, 5.0, n_features=16).double()
        with torch.no_grad():  # visibly curved: gamma' varies along t
            s.w2.normal_(0.0, 4.0)
            s.w3.normal_(0.0, 3.0).abs_()
        return s
    return lambda t: -6.0 + 11.0 * t + 1.5 * torch.sin(3.0 * t)  # another library's gamma(t), autograd's gamma'


def gaussian_model(kind="nnet", seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    s2 = 0.01 + 0.3 * torch.rand(D, generator=g, dtype=torch.float64)
    model = vnn.VDM(GaussianDenoiser(mu, q, s2), _schedule(kind), SHAPE, vocab_size=17).eval()
    return model.double() if isinstance(model.schedule, nn.Module) else model.to(torch.float64)


def closed_form(model, z_0):
    """``(log p_ODE(z_0), z_1)`` of the Gaussian model, exactly."""
    net = model.score_net
    gammas, _ = model.gamma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    gammas = gammas.detach()
    v = net.variances(gammas)  # [2, D]
    alpha = torch.sqrt(torch.sigmoid(-gammas))
    u_0 = (z_0.reshape(len(z_0), -1) - alpha[0] * net.mu.detach()) @ net.q
    z_1 = alpha[1] * net.mu.detach() + (u_0 * torch.sqrt(v[1] / v[0])) @ net.q.T
    log_p = (-0.5 * z_1.pow(2).sum(dim=1) - 0.5 * D * math.log(2 * math.pi)
             + 0.5 * torch.log(v[1] / v[0]).sum())
    return log_p, z_1


@pytest.mark.parametrize("kind", ["fixed", "nnet", "autograd"])
def test_ode_log_density_matches_the_closed_form_of_gaussian_data(kind):
    model = gaussian_model(kind)
    g = torch.Generator().manual_seed(1)
    # points from the model's marginal at t = 0 and far from it
    z_0 = torch.cat([torch.randn(3, *SHAPE, generator=g, dtype=torch.float64) * 0.3,
                     torch.randn(2, *SHAPE, generator=g, dtype=torch.float64) * 2.0])
    expected, z_1 = closed_form(model, z_0)
    errors, nfe = {}, {}
    for tol, limit in CLOSED_FORM_TOL.items():
        got = likelihood.ode_log_density(model, z_0, trace="exact", rtol=tol, atol=tol)
        errors[tol], nfe[tol] = (got.log_density - expected).abs().max().item(), got.nfe
        assert errors[tol] < limit, (tol, errors[tol])
        assert torch.allclose(got.z_1.reshape(len(z_0), -1), z_1, atol=100 * limit)
    # the solver's tolerance is what sets the error: a tighter one costs more evaluations
    assert errors[1e-10] < errors[1e-6] and nfe[1e-10] > nfe[1e-6] > 10


def test_near_the_prior_the_ode_density_is_the_marginal_density():
    """With gamma_1 = 20 the marginal of z_1 is N(0, I) but for a shift of alpha_1 |mu| ~ 6e-5,
    so log p_ODE(z_0) is the log density of z_0's marginal N(alpha_0 mu, V_0) to ~1e-3."""
    model = gaussian_model("fixed")
    model.schedule = vnn.FixedLinearSchedule(-6.0, 20.0)
    net = model.score_net
    z_0 = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3
    gamma_0 = torch.tensor([-6.0], dtype=torch.float64)
    alpha_0 = torch.sqrt(torch.sigmoid(-gamma_0))
    cov = net.q @ torch.diag(net.variances(gamma_0)[0]) @ net.q.T
    marginal = torch.distributions.MultivariateNormal(alpha_0 * net.mu.detach(), covariance_matrix=cov)
    got = likelihood.ode_log_density(model, z_0, rtol=1e-10, atol=1e-10)
    assert torch.allclose(got.log_density, marginal.log_prob(z_0.reshape(4, -1)), atol=1e-3)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_around_the_closed_form(kind):
    """One probe per copy of one point, 256 copies: their mean is within 4 standard errors of
    the exact density, and the spread is that of an estimator (nonzero: the Jacobian is not
    diagonal, so even Rademacher probes are not exact)."""
    model = gaussian_model("nnet")
    z = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    copies = z.expand(256, *SHAPE).contiguous()
    probes = likelihood.draw_probes(torch.Generator().manual_seed(4), 1, (256, *SHAPE), kind)
    got = likelihood.ode_log_density(model, copies, trace="hutchinson", probes=probes, rtol=1e-7, atol=1e-7)
    expected, _ = closed_form(model, z)
    d = got.log_density - expected
    se = d.std().item() / math.sqrt(len(d))
    assert 0 < se and abs(d.mean().item()) < 4 * se, (d.mean().item(), se)


def test_the_exact_trace_is_the_jacobians_trace_on_a_score_unet():
    torch.manual_seed(0)
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=0, dropout=0.0, gamma_min=-7.0, gamma_max=5.0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model = vnn.VDM(net, vnn.FixedLinearSchedule(-7.0, 5.0), (1, 4, 4), vocab_size=17).double().eval()
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    gamma = torch.full((3,), -1.0, dtype=torch.float64)
    for max_batch in (3, 10, 1000):  # replicas chunked in any way give the same trace
        flow = likelihood._Flow(model, None, "exact", None, max_batch)
        eps_hat, trace = flow._trace(z, gamma)
        dense = [torch.autograd.functional.jacobian(lambda v: model.predict_eps(v, gamma[:1], None, 0.0),
                                                    z[i:i + 1]).reshape(16, 16).trace() for i in range(3)]
        assert torch.allclose(trace, torch.stack(dense), rtol=1e-10, atol=1e-10)
        assert torch.allclose(eps_hat, model.predict_eps(z, gamma, None, 0.0), rtol=0, atol=1e-12)


def test_ode_bound_parts():
    """The bound's pieces: log q(z_0 | x) is the Gaussian log density of z_0, the reconstruction
    is the model's own decoder term, and the bound is their sum with -log p_ODE."""
    model = gaussian_model("fixed")
    x = torch.randint(0, 17, (3, *SHAPE), generator=torch.Generator().manual_seed(5))
    eps_0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = likelihood.ode_bound(model, x, eps_0, rtol=1e-7, atol=1e-7)
    gamma_0 = torch.tensor(-6.0, dtype=torch.float64)
    alpha_0, sigma_0 = torch.sqrt(torch.sigmoid(-gamma_0)), torch.sqrt(torch.sigmoid(gamma_0))
    f = encode(x, 17, torch.float64)
    z_0 = alpha_0 * f + sigma_0 * eps_0
    q = torch.distributions.Normal(alpha_0 * f, sigma_0).log_prob(z_0).reshape(3, -1).sum(1)
    assert torch.allclose(out.log_q, q, rtol=1e-12)
    assert torch.allclose(out.log_p_ode, closed_form(model, z_0)[0], atol=1e-3)
    forward = model(x, t=torch.full((3,), 0.5, dtype=torch.float64), eps=eps_0, eps_0=eps_0)
    assert torch.allclose(out.reconstruction, forward.reconstruction, rtol=1e-12)
    assert torch.allclose(out.nats, out.reconstruction + out.log_q - out.log_p_ode)
    assert torch.allclose(out.bpd, out.nats / (D * math.log(2)))


def test_refusals_name_the_argument():
    model = gaussian_model("fixed")
    z = torch.zeros(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="probes"):
        likelihood.ode_log_density(model, z, trace="hutchinson")
    with pytest.raises(ValueError, match="method"):
        likelihood.ode_log_density(model, z, method="euler")
    with pytest.raises(ValueError, match="rtol"):
        likelihood.ode_log_density(model, z, rtol=0.0)
    with pytest.raises(ValueError, match="trace"):
        likelihood.ode_log_density(model, z, trace="approximate")
    with pytest.raises(ValueError, match="z_0"):
        likelihood.ode_log_density(model, torch.zeros(2, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels"):
        likelihood.ode_log_density(model, z, labels=torch.zeros(2, dtype=torch.long))
    assert likelihood.default_trace(64) == "exact" and likelihood.default_trace(3072) == "hutchinson"
    with pytest.raises(ValueError, match="probe kind"):
        likelihood.draw_probes(None, 1, (2,), "uniform")


def test_on_the_digits_an_exact_score_gives_an_ode_bound_equal_to_the_diffusion_bound():
    """End to end on the real digits (decoder, dequantisation, log q, the ODE): the model is the
    Bayes-optimal denoiser of a Gaussian fitted to the training digits, so its score is exact and
    its reverse process is the forward process's time reversal; the continuous-time bound then
    exceeds the ODE's only by the prior's mismatch at t = 1 (N(0, I) against the Gaussian's
    marginal there, tiny at gamma_1 = 5). The diffusion term is taken in expectation over eps
    (Gauss-Legendre in t), and the decoder term cancels (the same eps_0 in both), so what is
    left is the Monte-Carlo noise of the ODE bound's log q - log p_ODE over 8 draws of z_0:
    measured -0.002 +- 0.011 bits per dim over 16 test images."""
    from vdm_fast.training import data
    from vdm_fast.reference.loss import prior_loss

    ds = data.load_digits()
    f = encode(ds.train.images.reshape(len(ds.train.images), 64), 17, torch.float64)
    cov = torch.cov(f.T) + 1e-4 * torch.eye(64, dtype=torch.float64)
    s2, q = torch.linalg.eigh(cov)
    model = vnn.VDM(GaussianDenoiser(f.mean(0), q, s2), vnn.FixedLinearSchedule(-7.0, 5.0), (1, 8, 8),
                    vocab_size=17).double().eval()
    n, x = 16, ds.test.images[:16]
    u = (encode(x, 17, torch.float64).reshape(n, 64) - f.mean(0)) @ q  # the images in the eigenbasis
    nodes, weights = np.polynomial.legendre.leggauss(400)
    t, w = torch.tensor((nodes + 1) / 2), torch.tensor(weights / 2)
    gamma, dgamma = model.gamma(t)
    a2, sg2 = torch.sigmoid(-gamma.detach())[:, None], torch.sigmoid(gamma.detach())[:, None]
    v = a2 * s2 + sg2  # [t, D]
    # E_eps ||eps - eps_hat||^2 = tr((I - sigma^2 V^-1)^2) + sigma^2 alpha^2 ||V^-1 (f - mu)||^2
    mse = ((1 - sg2 / v) ** 2).sum(1)[None] + (sg2 * a2).T * ((u[:, None, :] / v[None]) ** 2).sum(-1)
    diffusion = 0.5 * (mse * (dgamma.detach() * w)[None]).sum(1)
    bound = prior_loss(encode(x, 17, torch.float64), torch.tensor(5.0, dtype=torch.float64).expand(n)) + diffusion
    g = torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(8):
        out = likelihood.ode_bound(model, x, torch.randn(x.shape, generator=g, dtype=torch.float64),
                                   rtol=1e-7, atol=1e-7)
        gaps.append(bound - (out.log_q - out.log_p_ode))
    gap = torch.stack(gaps).mean(0) / (64 * math.log(2))
    se = gap.std().item() / math.sqrt(n)
    assert abs(gap.mean().item()) < max(4 * se, 1e-3) and se < 0.03, (gap.mean().item(), se)


def test_the_divergence_integral_is_the_log_determinant_of_the_flow_map():
    """On a nonlinear network (a random ScoreUNet, learned scalar schedule, float64, 16 dims):
    log p_ODE(z_0) = log N(z_1; 0, I) + log |det dz_1/dz_0|, the Jacobian by central finite
    differences of the flow (all 32 perturbed copies on one step mesh): measured 3e-6 nats apart
    at rtol = atol = 1e-8. (Without the Fourier features: with them a random network's flow is
    so expansive, singular values of dz_1/dz_0 in the thousands, that finite differences do not
    converge.)"""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=0, dropout=0.0, gamma_min=-7.0, gamma_max=5.0,
                        fourier_features=False)
    for p in net.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    model = vnn.VDM(net, vnn.LearnedScalarSchedule(-7.0, 5.0), (1, 4, 4), vocab_size=17).double().eval()
    z_0 = 0.5 * torch.randn(1, 1, 4, 4, dtype=torch.float64)
    got = likelihood.ode_log_density(model, z_0, rtol=1e-8, atol=1e-8)

    def velocity(t, z):
        gamma, dgamma = model.gamma(t.clamp(0.0, 1.0).reshape(1))
        sigma2 = torch.sigmoid(gamma)
        return -0.5 * dgamma * (sigma2 * z - sigma2.sqrt() * model.predict_eps(z, gamma.expand(len(z)), None, 0.0))

    delta, eye = 1e-5, torch.eye(16, dtype=torch.float64)
    copies = torch.cat([z_0.reshape(1, 16) + delta * eye, z_0.reshape(1, 16) - delta * eye]).reshape(32, 1, 4, 4)
    with torch.no_grad():
        z_1 = odeint(velocity, copies, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8)[-1]
    jacobian = (z_1[:16] - z_1[16:]).reshape(16, 16).T / (2 * delta)
    expected = (-0.5 * got.z_1.pow(2).sum() - 8 * math.log(2 * math.pi) + torch.linalg.slogdet(jacobian)[1]).item()
    assert abs(got.log_density.item() - expected) < 1e-3, (got.log_density.item(), expected)
