"""The schedule family (``gamma_nnet``, ``gamma_nnet_pinned``, ``variance_gradients``): the
reference against analytic truths, the ops and the kernels against the autograd reference, bad
input refused by name, opcheck, torch.compile and the dispatcher's call paths."""

import pytest
import torch
from helpers import RTOL, assert_close, needs_cpu_kernels
from torch.utils._python_dispatch import TorchDispatchMode

from vdm_fast import ops
from vdm_fast import nn as vnn
from vdm_fast.ops import schedule as ops_schedule
from vdm_fast.reference import schedule as ref


def _random_nnet_params(n=64, dtype=torch.float64):
    """Random raw parameters, negative weights included (the network uses |w|)."""
    return (torch.randn(1, 1, dtype=dtype) * 5, torch.randn(1, dtype=dtype) * 5,
            torch.randn(n, 1, dtype=dtype) * 3, torch.randn(n, dtype=dtype) * 2,
            torch.randn(1, n, dtype=dtype) * 10)


@pytest.mark.parametrize("seed", range(5))
def test_nnet_schedule_is_increasing_and_its_derivative_matches_finite_differences(seed):
    torch.manual_seed(seed)
    params = _random_nnet_params()
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    gamma, dgamma = ref.nnet(t, *params)
    assert (gamma[1:] > gamma[:-1]).all() and (dgamma > 0).all()
    h = 1e-6
    t_in = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    fd = (ref.nnet_gamma(t_in + h, *params) - ref.nnet_gamma(t_in - h, *params)) / (2 * h)
    assert_close(ref.nnet(t_in, *params)[1], fd, 1e-7)


def test_nnet_schedule_formula_at_the_endpoints():
    w1, b1, w2, b2, w3 = _random_nnet_params(n=8)
    n = 8
    for t in (0.0, 1.0):
        h = torch.sigmoid(w2.abs()[:, 0] * (2 * t - 1) + b2)
        expected = b1 + w1.abs()[0] * t + (w3.abs()[0] * (2 * h - 1)).sum() / n
        assert_close(ref.nnet_gamma(torch.tensor([t], dtype=torch.float64), w1, b1, w2, b2, w3), expected, 1e-14)


# --- the fused op against the autograd reference ------------------------------------------------

def _times(B, dtype):
    t = torch.rand(B, dtype=dtype)
    t[: min(B, 2)] = torch.tensor([0.0, 1.0], dtype=dtype)[: min(B, 2)]  # the endpoints exactly
    return t


def _fused_and_reference(fn, t, params, upstream):
    """Outputs and all gradients of ``fn`` (fused) and of the autograd reference, for upstream
    gradients on gamma, on gamma' or on both (None: that output does not reach the loss)."""
    results = []
    for impl in (fn, ref.nnet):
        leaves = [x.detach().clone().requires_grad_() for x in (t, *params)]
        outputs = impl(*leaves)
        total = sum((out * up).sum() for out, up in zip(outputs, upstream) if up is not None)
        results.append((*outputs, *torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)))
    return results


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, n", [(1, 1), (37, 7), (300, 1024)])
@pytest.mark.parametrize("which", ["gamma", "dgamma", "both"])
def test_fused_schedule_matches_autograd_reference(dtype, B, n, which, poisoned):
    poisoned(ops_schedule)
    params = _random_nnet_params(n, dtype)
    t = _times(B, dtype)
    gg = torch.randn(B, dtype=dtype) if which in ("gamma", "both") else None
    gd = torch.randn(B, dtype=dtype) if which in ("dgamma", "both") else None
    fused, truth = _fused_and_reference(ops.gamma_nnet, t, params, (gg, gd))
    names = ("gamma", "gamma'", "grad t", "grad w1", "grad b1", "grad w2", "grad b2", "grad w3")
    for a, b, name in zip(fused, truth, names):
        assert_close(a, b, RTOL[dtype] * 10, name)


@needs_cpu_kernels
def test_fused_schedule_gradcheck_float64():
    params = [p.requires_grad_() for p in _random_nnet_params(5)]
    t = torch.rand(6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ops.gamma_nnet(*a), (t, *params))


@needs_cpu_kernels
@pytest.mark.parametrize("seed", range(3))
def test_fused_schedule_is_monotone(seed):
    torch.manual_seed(seed)
    params = _random_nnet_params(1024)
    gamma, dgamma = ops.gamma_nnet(torch.linspace(0, 1, 2001, dtype=torch.float64), *params)
    assert (gamma[1:] > gamma[:-1]).all() and (dgamma > 0).all()


@needs_cpu_kernels
def test_fused_schedule_opcheck_and_compile():
    params = [p.float().requires_grad_() for p in _random_nnet_params(9)]
    t = torch.rand(5)
    torch.library.opcheck(torch.ops.vdm_fast.gamma_nnet.default, (t.clone().requires_grad_(), *params))
    torch.library.opcheck(torch.ops.vdm_fast.gamma_nnet_backward.default,
                          (t, *[p.detach() for p in params], torch.randn(5), torch.randn(5)))

    def loss(t, *p):
        gamma, dgamma = ops.gamma_nnet(t, *p)
        return (gamma.sin() * dgamma).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a = torch.autograd.grad(compiled(t, *params), params)
    b = torch.autograd.grad(loss(t, *params), params)
    for u, v in zip(a, b):
        assert_close(u, v, 1e-5)


@needs_cpu_kernels
def test_pinned_schedule_hits_its_endpoints_and_matches_the_reference_composition():
    w1, b1, w2, b2, w3 = _random_nnet_params(16)
    g0, g1 = torch.tensor([-11.0], dtype=torch.float64), torch.tensor([6.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    gamma, dgamma = ops.gamma_nnet_pinned(t, w1, b1, w2, b2, w3, g0, g1)
    assert_close(gamma[[0, 2]], torch.tensor([-11.0, 6.0], dtype=torch.float64), 1e-13)
    g_all, dg_all = ref.nnet(torch.tensor([0.3, 0.0, 1.0], dtype=torch.float64), w1, b1, w2, b2, w3)
    scale = 17.0 / (g_all[2] - g_all[1])
    assert_close(gamma[1], -11.0 + scale * (g_all[0] - g_all[1]), 1e-12)
    assert_close(dgamma[1], scale * dg_all[0], 1e-12)


@needs_cpu_kernels
def test_variance_gradients_equal_autograd_of_the_summed_squared_loss():
    """Shape parameters: sum_i 2 L_i dL_i/d eta == d/d eta sum_i L_i^2 (autograd, reference)."""
    params = [p.requires_grad_() for p in _random_nnet_params(12)]
    endpoints = [torch.tensor([-10.0], dtype=torch.float64, requires_grad=True),
                 torch.tensor([4.0], dtype=torch.float64, requires_grad=True)]
    B = 9
    t = torch.rand(B, dtype=torch.float64)
    f, eps = torch.rand(B, 5, dtype=torch.float64), torch.randn(B, 5, dtype=torch.float64)

    def per_example_loss(gamma, dgamma):  # a continuous-time diffusion loss with a toy denoiser
        z = torch.sqrt(torch.sigmoid(-gamma))[:, None] * f + torch.sqrt(torch.sigmoid(gamma))[:, None] * eps
        eps_hat = torch.tanh(z) * torch.sigmoid(gamma)[:, None]
        return 0.5 * dgamma * ((eps - eps_hat) ** 2).sum(1)

    # Autograd truth on the reference schedule, pinned by hand.
    g, dg = ref.nnet(torch.cat([t, torch.tensor([0.0, 1.0], dtype=torch.float64)]), *params)
    scale = (endpoints[1] - endpoints[0]) / (g[B + 1] - g[B])
    L = per_example_loss(endpoints[0] + scale * (g[:B] - g[B]), scale * dg[:B])
    expected = torch.autograd.grad((L**2).sum(), params)

    # The fused path: per-example cotangents from an ordinary backward, then the companion.
    gamma, dgamma = ops.gamma_nnet_pinned(t, *params, *endpoints)
    L = per_example_loss(gamma, dgamma)
    grad_gamma, grad_dgamma = torch.autograd.grad(L.sum(), (gamma, dgamma))
    got = ops.variance_gradients(t, params, grad_gamma, grad_dgamma, L, endpoints=endpoints)
    # The pinned form does not depend on b1 at all: its gradient is rounding noise around zero,
    # so the tolerance is set by the largest gradient.
    atol = 1e-10 * max(e.abs().max().item() for e in expected)
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-10, atol=atol)

    schedule = vnn.MonotoneNetSchedule(n_features=12, pinned=True).double()
    with torch.no_grad():
        for p, q in zip(schedule.network(), params):
            p.copy_(q)
        schedule.gamma_0.copy_(endpoints[0])
        schedule.gamma_1.copy_(endpoints[1])
    for g, b in zip(schedule.variance_gradients(t, grad_gamma, grad_dgamma, L), expected):
        assert_close(g, b, 1e-10, atol=atol)
    assert all(p.grad is None for p in schedule.parameters())  # returned, not set


# --- bad input: refused by name ---------------------------------------------------------------

@pytest.mark.parametrize("change, error, match", [
    (dict(t=torch.tensor([0.5, 1.5])), ValueError, r"t must lie in \[0, 1\]"),
    (dict(t=torch.tensor([-0.25, 0.5, 0.75])), ValueError, r"t must lie in \[0, 1\], got values in \[-0.25, 0.75\]"),
    (dict(t=torch.tensor([0.5, float("nan")])), ValueError, r"t must lie in \[0, 1\], got values in \[nan, nan\]"),
    (dict(t=torch.tensor([[0.5]])), ValueError, "t must be a non-empty 1-d tensor"),
    (dict(w2=torch.randn(4)), ValueError, "w2 must have shape"),
    (dict(w3=torch.randn(1, 5)), ValueError, r"w3 must have shape \(1, 4\)"),
    (dict(b1=torch.randn(1, dtype=torch.float64)), TypeError, "b1 must have t's dtype"),
    (dict(t=torch.tensor([1, 0])), TypeError, "t must be a floating-point tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_schedule_rejects(change, error, match, backend, use_backend):
    """On the CPU kernel (which reads t's range as it runs) and on the reference path alike."""
    use_backend(backend)
    good = dict(t=torch.rand(3), w1=torch.randn(1, 1), b1=torch.randn(1), w2=torch.randn(4, 1),
                b2=torch.randn(4), w3=torch.randn(1, 4))
    with pytest.raises(error, match=match):
        ops.gamma_nnet(**{**good, **change})


def test_variance_gradients_check_every_shape():
    B, n = 6, 8
    t = torch.rand(B, dtype=torch.float64)
    net = [torch.randn(1, 1, dtype=torch.float64), torch.randn(1, dtype=torch.float64),
           torch.randn(n, 1, dtype=torch.float64), torch.randn(n, dtype=torch.float64),
           torch.randn(1, n, dtype=torch.float64)]
    g, dg, loss = (torch.randn(B, dtype=torch.float64) for _ in range(3))
    ops.variance_gradients(t, net, g, dg, loss)  # well-formed: accepted
    for bad in (dict(loss=loss[:, None]), dict(grad_gamma=g[:1]), dict(grad_dgamma=dg[:, None]),
                dict(loss=loss.float().to("meta"))):
        args = {**dict(grad_gamma=g, grad_dgamma=dg, loss=loss), **bad}
        name = next(iter(bad))
        with pytest.raises((ValueError, TypeError), match=name):
            ops.variance_gradients(t, net, **args)


def test_a_constant_pinned_network_is_refused_by_name():
    """w1 = 0 and w3 = 0 make g(1) = g(0): the pinned schedule's 0 / 0 was a silent NaN."""
    t = torch.rand(5)
    params = [torch.zeros(1, 1), torch.randn(1), torch.randn(4, 1), torch.randn(4), torch.zeros(1, 4)]
    with pytest.raises(ValueError, match=r"g\(1\) - g\(0\) is resolved in torch.float32.*constant network"):
        ops.gamma_nnet_pinned(t, *params, torch.tensor([-7.0]), torch.tensor([5.0]))
    params[0] = torch.ones(1, 1)
    gamma, _ = ops.gamma_nnet_pinned(t, *params, torch.tensor([-7.0]), torch.tensor([5.0]))
    assert torch.isfinite(gamma).all()


# --- Triton kernels (interpreted on the CPU where no GPU exists) and CUDA ---------------------

triton_schedule = pytest.importorskip("vdm_fast.kernels.schedule", reason="triton is not installed")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, n", [(1, 1), (33, 130), (100, 130)])  # ragged tiles in both directions
@pytest.mark.parametrize("max_programs", [128, 2])  # 2: each backward program loops over tiles
def test_triton_schedule_matches_autograd_reference(dtype, B, n, max_programs, poisoned, monkeypatch):
    poisoned(triton_schedule)
    monkeypatch.setattr(triton_schedule, "MAX_EXAMPLE_PROGRAMS", max_programs)
    params = _random_nnet_params(n, dtype)
    t = _times(B, dtype)
    gg, gd = torch.randn(B, dtype=dtype), torch.randn(B, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (t, *params)]
    gamma, dgamma = ref.nnet(*leaves)
    truth = (gamma, dgamma, *torch.autograd.grad((gamma * gg + dgamma * gd).sum(), leaves))
    got = (*triton_schedule.nnet_forward(t, *params), *triton_schedule.nnet_backward(t, *params, gg, gd))
    for a, b in zip(got, truth):
        assert_close(a, b, RTOL[dtype] * 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B", [1, 128, 1000, 65536])
def test_cuda_schedule_matches_autograd_reference(B, poisoned):
    poisoned(ops_schedule)
    poisoned(triton_schedule)
    for dtype in (torch.float64, torch.float32):
        params = _random_nnet_params(1024, dtype)
        t = _times(B, dtype)
        upstream = (torch.randn(B, dtype=dtype), torch.randn(B, dtype=dtype))
        _, truth = _fused_and_reference(ops.gamma_nnet, t, params, upstream)
        fused, _ = _fused_and_reference(ops.gamma_nnet, t.cuda(), [p.cuda() for p in params],
                                        [u.cuda() for u in upstream])
        for a, b in zip(fused, truth):
            assert_close(a.cpu(), b, RTOL[dtype] * 100)
        again, _ = _fused_and_reference(ops.gamma_nnet, t.cuda(), [p.cuda() for p in params],
                                        [u.cuda() for u in upstream])
        assert all(torch.equal(a, b) for a, b in zip(fused, again)), "not deterministic"


# --- the call paths through the dispatcher ----------------------------------------------------

class _RecordOps(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_cpu_kernels
def test_eager_calls_and_dispatch_modes_run_the_registered_ops():
    """One call path: an eager call and a call under a dispatch mode (make_fx, fake tensors,
    FlopCounterMode) both reach the registered ops, with the same results to the bit."""
    t = torch.rand(16, dtype=torch.float64)
    params = [p.requires_grad_() for p in _random_nnet_params(n=8)]
    weights = torch.randn(2, 16, dtype=torch.float64)

    def run():
        gamma, dgamma = ops.gamma_nnet(t, *params)
        return (gamma, dgamma, *torch.autograd.grad((weights[0] * gamma + weights[1] * dgamma).sum(), params))

    with _RecordOps() as mode:
        traced = run()
    assert "vdm_fast.gamma_nnet.default" in mode.ops and "vdm_fast.gamma_nnet_backward.default" in mode.ops
    eager = run()
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)


@needs_cpu_kernels
def test_vmap_goes_through_the_registered_op():
    """vmap's batched tensors look like plain tensors but hold no storage: the op takes torch's
    per-example fallback, never their data pointers."""
    t = torch.rand(3, 16, dtype=torch.float64)
    params = _random_nnet_params(n=8)
    gamma, dgamma = torch.vmap(lambda row: ops.gamma_nnet(row, *params))(t)
    for i in range(3):
        expected = ops.gamma_nnet(t[i], *params)
        assert torch.equal(gamma[i], expected[0]) and torch.equal(dgamma[i], expected[1])
