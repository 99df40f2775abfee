"""``nn/vdm.py``: the VDM model (the bound as the reference composition, its sampler, the four
parameterisations, weighted objectives, guidance), its autocast scope, the schedule's gradient
under weighted objectives and variance minimisation, and bad input refused by name."""

import math

import pytest
import torch
from helpers import assert_close, tiny_digits_vdm

from vdm_fast import config
from vdm_fast import nn as vnn
from vdm_fast.nn import LearnedScalarSchedule, MonotoneNetSchedule
from vdm_fast.diffusion import parameterization as param
from vdm_fast.diffusion import pixels
from vdm_fast.reference import loss as ref_loss


def small_vdm(schedule="scalar", attention="middle", channels=1, size=6, vocab=17, n_layer=1):
    net = vnn.ScoreUNet(in_channels=channels, n_embd=32, n_layer=n_layer, dropout=0.0, attention=attention)
    return vnn.VDM(net, vnn.SCHEDULES[schedule](), (channels, size, size), vocab_size=vocab)


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


def test_bpd_evaluation_runs_without_grad_and_with_T():
    model = small_vdm().eval()
    x = torch.randint(0, 17, (2, 1, 6, 6))
    for T in (0, 5):
        bpd = model.bpd(x, T=T)
        assert bpd.shape == (2,) and not bpd.requires_grad and torch.isfinite(bpd).all()


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


# --- the unified view at the model level: parameterisations, weightings, guidance ---------------

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


# --- autocast covers the score network only ---------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_schedule_and_loss_stay_float32_under_the_score_networks_autocast(use_backend, backend):
    use_backend(backend)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    seen = {}
    results = []
    for autocast in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = tiny_digits_vdm(MonotoneNetSchedule(-7.0, 5.0, n_features=16), torch.float32, autocast_dtype=autocast)
        model.schedule.register_forward_hook(lambda m, i, out: seen.__setitem__("schedule", out))
        model.score_net.conv_out.register_forward_hook(lambda m, i, out: seen.__setitem__("net", out.dtype))
        out = model(x, generator=torch.Generator().manual_seed(1))
        assert all(g.dtype == torch.float32 for g in seen["schedule"])
        assert seen["net"] == (autocast or torch.float32)  # the autocast does reach the network
        assert out.bpd.dtype == torch.float32
        results.append(seen["schedule"])
    for a, b in zip(*results):  # the schedule computes exactly what it does without autocast
        assert torch.equal(a, b)


# --- weighted objectives never train the schedule ---------------------------------------------

@pytest.mark.parametrize("schedule_cls", [LearnedScalarSchedule, MonotoneNetSchedule])
@pytest.mark.parametrize("T", [0, 10])
def test_the_schedules_gradient_is_the_bounds_for_every_weighting(schedule_cls, T):
    x = torch.randint(0, 17, (6, 1, 8, 8))
    draws = torch.Generator().manual_seed(3)
    t = torch.rand(6, generator=draws, dtype=torch.float64)
    eps, eps_0 = (torch.randn(6, 1, 8, 8, generator=draws, dtype=torch.float64) for _ in range(2))
    grads, objectives = {}, {}
    for weighting in ("elbo", "sigmoid", "eps_mse"):
        kwargs = dict(n_features=16) if schedule_cls is MonotoneNetSchedule else {}
        torch.manual_seed(5)
        model = tiny_digits_vdm(schedule_cls(-7.0, 5.0, **kwargs), weighting=weighting, sigmoid_bias=2.0)
        with torch.no_grad():  # a non-trivial network, so its gradient reaches the schedule
            for p in model.score_net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out = model(x, T=T, t=t, eps=eps, eps_0=eps_0)
        objective = model.objective(out)
        objective.mean().backward()
        objectives[weighting] = out, objective
        grads[weighting] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for weighting in ("sigmoid", "eps_mse"):
        for name, g in grads[weighting].items():
            if name.startswith("schedule."):
                assert_close(g, grads["elbo"][name], 1e-9, f"{weighting}: {name}")
        # ... while the network does train on the weighted loss:
        conv = "score_net.conv_out.weight"
        assert (grads[weighting][conv] - grads["elbo"][conv]).abs().max() > 1e-3 * grads["elbo"][conv].abs().max()
        # and the reported objective is the weighted loss.
        out, objective = objectives[weighting]
        assert not torch.allclose(objective, out.bpd)


# --- variance minimisation of the schedule's interior -----------------------------------------

def test_variance_gradients_are_those_of_the_mean_squared_diffusion_loss():
    model = tiny_digits_vdm(MonotoneNetSchedule(-7.0, 5.0, n_features=16, pinned=True), schedule_objective="variance")
    x = torch.randint(0, 17, (5, 1, 8, 8))
    draws = torch.Generator().manual_seed(4)
    t = torch.rand(5, generator=draws, dtype=torch.float64)
    eps, eps_0 = (torch.randn(5, 1, 8, 8, generator=draws, dtype=torch.float64) for _ in range(2))

    # The expected gradients by plain autograd, each from a forward of its own.
    out = model(x, t=t, eps=eps, eps_0=eps_0)
    network = model.schedule.network()
    expected = torch.autograd.grad(((out.diffusion / (64 * math.log(2))) ** 2).mean(), network)
    out = model(x, t=t, eps=eps, eps_0=eps_0)
    endpoints = torch.autograd.grad(model.objective(out).mean(), (model.schedule.gamma_0, model.schedule.gamma_1))

    # The trainer's way: the objective's backward, then the variance step sets the network's.
    out = model(x, t=t, eps=eps, eps_0=eps_0)
    model.objective(out).mean().backward()
    params = model.variance_step_(out)
    assert len(params) == len(network) and all(p is q for p, q in zip(params, network))
    for name, p, g in zip(("w1", "b1", "w2", "b2", "w3"), params, expected):
        assert_close(p.grad, g, 1e-9, name, atol=1e-15)
    assert_close(model.schedule.gamma_0.grad, endpoints[0], 1e-12, "gamma_0 keeps the bound's gradient")
    assert_close(model.schedule.gamma_1.grad, endpoints[1], 1e-12, "gamma_1 keeps the bound's gradient")


def test_variance_objective_needs_the_pinned_network_in_continuous_time():
    with pytest.raises(ValueError, match="pinned=True"):
        tiny_digits_vdm(MonotoneNetSchedule(n_features=16), schedule_objective="variance")
    with pytest.raises(ValueError, match="--schedule nnet"):
        config.resolve({"schedule_objective": "variance"})
    with pytest.raises(ValueError, match="continuous-time"):
        config.resolve({"schedule": "nnet", "schedule_objective": "variance", "T": 1000})
