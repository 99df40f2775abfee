"""The score network, the VDM model and its sampler (reference composition)."""

import math

import pytest
import torch
from helpers import assert_close

from vdm_fast import nn as vnn
from vdm_fast.diffusion import features, pixels, sampling
from vdm_fast.diffusion.process import alpha_sigma
from vdm_fast.reference import loss as ref_loss


def small_vdm(schedule="scalar", attention="middle", channels=1, size=6, vocab=17, n_layer=1):
    net = vnn.ScoreUNet(in_channels=channels, n_embd=32, n_layer=n_layer, dropout=0.0, attention=attention)
    return vnn.VDM(net, vnn.SCHEDULES[schedule](), (channels, size, size), vocab_size=vocab)


def test_fourier_features_follow_the_official_channel_order():
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = features.fourier_features(z)
    assert out.shape == (2, 12, 4, 5)
    for c in range(3):
        for k, power in enumerate((6, 7)):
            arg = 2.0**power * 2 * math.pi * z[:, c]
            assert_close(out[:, 2 * c + k], torch.sin(arg), 1e-12)  # sines first ...
            assert_close(out[:, 6 + 2 * c + k], torch.cos(arg), 1e-12)  # ... then cosines


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 3.0, 500.0], dtype=torch.float64)
    emb = features.timestep_embedding(t, 9)
    half = 4
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    assert_close(emb[:, :half], torch.sin(t[:, None] * freqs), 1e-12)
    assert_close(emb[:, half:2 * half], torch.cos(t[:, None] * freqs), 1e-12)
    assert (emb[:, -1] == 0).all()


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


@pytest.mark.parametrize("schedule", ["fixed", "scalar", "nnet"])
@pytest.mark.parametrize("T", [0, 10])
def test_vdm_returns_per_example_terms_and_bpd(schedule, T):
    model = small_vdm(schedule)
    x = torch.randint(0, 17, (4, 1, 6, 6))
    terms = model(x, T=T)
    for v in terms:
        assert v.shape == (4,) and torch.isfinite(v).all()
    total = terms.reconstruction + terms.prior + terms.diffusion
    assert_close(terms.bpd, total / (36 * math.log(2)), 1e-6)
    assert (terms.prior > 0).all() and (terms.diffusion > 0).all()
    sum(terms).sum().backward()
    assert all(p.grad is not None for p in model.schedule.parameters())


def test_vdm_loss_is_the_reference_composition():
    """One forward of the model equals the bound written out with the reference functions."""
    model = small_vdm("fixed").double()
    x = torch.randint(0, 17, (3, 1, 6, 6))
    terms = model(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = (torch.rand((), generator=g, dtype=torch.float64) + torch.arange(3, dtype=torch.float64) / 3) % 1.0
    f = pixels.encode(x, 17, torch.float64)
    gamma_t = -13.3 + 18.3 * t
    eps = torch.randn(f.shape, generator=g, dtype=torch.float64)
    eps_hat = model.score_net(ref_loss.diffuse(f, eps, gamma_t), gamma_t)
    assert_close(terms.diffusion, ref_loss.diffusion_loss(eps, eps_hat, torch.full((3,), 18.3, dtype=torch.float64)), 1e-12)
    assert_close(terms.prior, ref_loss.prior_loss(f, torch.full((3,), 5.0, dtype=torch.float64)), 1e-12)


def test_sampling_is_deterministic_for_a_seed_and_has_the_right_shape():
    model = small_vdm(channels=2, size=5).eval()
    a = model.sample(3, T=4, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, T=4, generator=torch.Generator().manual_seed(0))
    c = model.sample(3, T=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 5, 5) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 17
    sampled = model.sample(3, T=4, generator=torch.Generator().manual_seed(0), sample_x=True)
    assert sampled.shape == (3, 2, 5, 5)


def test_ancestral_step_matches_the_gaussian_posterior():
    """With eps_hat = the true eps, the step's mean is E[z_s | z_t, x] of q."""
    x = torch.randn(1000, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    g_t, g_s = torch.full((1000,), 2.0, dtype=torch.float64), torch.full((1000,), -1.0, dtype=torch.float64)
    z_t = ref_loss.diffuse(x, eps, g_t)
    mean = sampling.ancestral_step(z_t, eps, g_t, g_s, torch.zeros_like(x))
    # q(z_s | z_t, x) mean: (alpha_t|s sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_t|s^2 / sigma_t^2) x
    a_t, s_t = alpha_sigma(g_t[:, None])
    a_s, s_s = alpha_sigma(g_s[:, None])
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    expected = (a_ts * s_s**2 / s_t**2) * z_t + (a_s * var_ts / s_t**2) * x
    assert_close(mean, expected, 1e-12)


def test_bpd_evaluation_runs_without_grad_and_with_T():
    model = small_vdm().eval()
    x = torch.randint(0, 17, (2, 1, 6, 6))
    for T in (0, 5):
        bpd = model.bpd(x, T=T)
        assert bpd.shape == (2,) and not bpd.requires_grad and torch.isfinite(bpd).all()


# --- the unified view at the model level: parameterisations, weightings, guidance ---------------

from vdm_fast.diffusion import parameterization as param  # noqa: E402


class _AsKind(torch.nn.Module):
    """Turns an eps network into the equivalent network of another prediction kind."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, z, gamma, labels=None):
        return param.from_eps(self.net(z, gamma), z, gamma, self.kind)


def test_the_four_parameterisations_give_the_same_bound():
    base = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=1, dropout=0.0).double()
    for p in base.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 17, (4, 1, 6, 6))
    results = {}
    for kind in param.PREDICTIONS:
        model = vnn.VDM(_AsKind(base, kind), vnn.FixedLinearSchedule(), (1, 6, 6), vocab_size=17,
                        prediction=kind).double().eval()
        for T in (0, 10):
            results[kind, T] = model(x, T=T, generator=torch.Generator().manual_seed(3)).bpd
    for kind in param.PREDICTIONS:
        for T in (0, 10):
            assert_close(results[kind, T], results["eps", T], 1e-9, f"{kind}, T={T}")


def test_weighted_objectives():
    model = small_vdm("fixed").double().eval()
    x = torch.randint(0, 17, (3, 1, 6, 6))

    def run(weighting, **kw):
        model.weighting, model.sigmoid_bias = weighting, kw.get("bias", 0.0)
        return model(x, generator=torch.Generator().manual_seed(1))

    elbo = run("elbo")
    assert torch.equal(model.objective(elbo), elbo.bpd)  # w = 1 is the ELBO
    nearly_one = run("sigmoid", bias=60.0)  # sigmoid(60 + gamma) = 1 to double precision here
    assert_close(model.objective(nearly_one), elbo.bpd, 1e-12)
    simple = run("eps_mse")
    # The "simple" loss: the diffusion term becomes 0.5 ||eps - eps_hat||^2 = diffusion / gamma'.
    expected = (simple.reconstruction + simple.prior + simple.diffusion / 18.3) / (36 * math.log(2))
    assert_close(model.objective(simple), expected, 1e-12)
    assert torch.equal(simple.bpd, elbo.bpd)  # the bound itself is unchanged


def test_guidance_scale_zero_is_the_conditional_model():
    # 64 channels, 2 per GroupNorm group: with one a group (32) the class embedding, added before
    # a GroupNorm, is normalised away exactly and the labels change nothing but rounding.
    net = vnn.ScoreUNet(in_channels=1, n_embd=64, n_layer=1, dropout=0.0, num_classes=10)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model = vnn.VDM(net, vnn.FixedLinearSchedule(), (1, 6, 6), vocab_size=17, num_classes=10).eval()
    z, gamma, labels = torch.randn(4, 1, 6, 6), torch.full((4,), -2.0), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        eps_c, eps_u = net(z, gamma, labels), net(z, gamma, torch.full_like(labels, 10))
        assert torch.equal(model.predict_eps(z, gamma, labels, 0.0), eps_c)
        assert_close(model.predict_eps(z, gamma, labels, 2.0), 3.0 * eps_c - 2.0 * eps_u, 1e-6)
    a = model.sample(4, T=3, generator=torch.Generator().manual_seed(0), labels=labels, guidance=0.0)
    b = model.sample(4, T=3, generator=torch.Generator().manual_seed(0), labels=labels, guidance=0.0)
    assert torch.equal(a, b)
    assert not torch.equal(net(z, gamma, labels), net(z, gamma, labels.flip(0)))  # labels matter
    # Training drops labels to the null class; evaluation never does.
    x = torch.randint(0, 17, (4, 1, 6, 6))
    with pytest.raises(ValueError, match="needs labels"):
        model(x)
    with pytest.raises(ValueError, match="samples with labels"):
        model.sample(2, T=2)
    plain = small_vdm()
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, labels=labels)


def _attributes(model):
    """Every module's attributes: plain values as they are, tensors and torch's bookkeeping
    dicts (parameters, buffers, submodules, hooks) by their keys."""
    state = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                attrs[key] = ("tensor", tuple(value.shape))
            elif isinstance(value, dict):
                attrs[key] = ("dict", sorted(value))
            else:
                attrs[key] = value
        state[name] = attrs
    return state


@pytest.mark.parametrize("schedule_objective, weighting", [("variance", "elbo"), ("elbo", "sigmoid"),
                                                           ("variance", "eps_mse")])
def test_a_training_forward_leaves_nothing_on_the_module(schedule_objective, weighting):
    """The forward returns all that the objectives need: the module's attributes after a
    training forward, backward and variance gradients are those before."""
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=1, dropout=0.1, num_classes=3)
    schedule = vnn.MonotoneNetSchedule(n_features=8, pinned=True)
    model = vnn.VDM(net, schedule, (1, 6, 6), vocab_size=17, weighting=weighting, num_classes=3,
                    schedule_objective=schedule_objective).train()
    before = _attributes(model)
    x, labels = torch.randint(0, 17, (4, 1, 6, 6)), torch.tensor([0, 1, 2, 3])
    out = model(x, generator=torch.Generator().manual_seed(0), labels=labels)
    assert _attributes(model) == before
    model.objective(out).mean().backward()
    if schedule_objective == "variance":
        params = model.variance_step_(out)
        assert [p.grad.shape for p in params] == [p.shape for p in model.schedule.network()]
    assert _attributes(model) == before
    assert out.weight.shape == (4,) and not out.weight.requires_grad
    assert out.gamma_t.requires_grad and out.dgamma_dt.requires_grad
