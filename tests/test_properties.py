"""The property-based suite (tests/properties.py, hypothesis) and the hostile numbers it grew
from: every failure of compiled code must reach Python as an exception or a NaN, never end the
process, and extreme valid values give the float64 answer."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import needs_cpu_kernels

from vdm_fast import ops
from vdm_fast.reference import loss as ref

HERE = os.path.dirname(__file__)
# CI's bounded run: a fixed seed and an example count that fits its time (a longer run is the
# same script with a larger --examples; its totals are in benchmarks/RESULTS.md).
CI_EXAMPLES, CI_SEED = 500, 0


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, cwd="/")


def test_the_property_suite_passes_in_its_own_process():
    pytest.importorskip("hypothesis")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "properties.py"), "--examples", str(CI_EXAMPLES),
                           "--seed", str(CI_SEED)], capture_output=True, text=True, timeout=1800, cwd="/")
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-6000:], proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(" passed, 0 failed") and "cases tried" in lines[-2], proc.stdout[-2000:]
    assert int(lines[-2].split()[0]) >= CI_EXAMPLES * 6


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


def test_a_constant_pinned_network_is_refused_by_name():
    """w1 = 0 and w3 = 0 make g(1) = g(0): the pinned schedule's 0 / 0 was a silent NaN."""
    t = torch.rand(5)
    params = [torch.zeros(1, 1), torch.randn(1), torch.randn(4, 1), torch.randn(4), torch.zeros(1, 4)]
    with pytest.raises(ValueError, match=r"g\(1\) - g\(0\) is resolved in torch.float32.*constant network"):
        ops.gamma_nnet_pinned(t, *params, torch.tensor([-7.0]), torch.tensor([5.0]))
    params[0] = torch.ones(1, 1)
    gamma, _ = ops.gamma_nnet_pinned(t, *params, torch.tensor([-7.0]), torch.tensor([5.0]))
    assert torch.isfinite(gamma).all()
