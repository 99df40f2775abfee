"""GroupNorm (+ swish, + conditioning): the C++ kernels and the Triton kernels (interpreted on
the CPU where no GPU exists) against the reference, forward and backward."""

import pytest
import torch
from helpers import RTOL, assert_close

from vdm_fast import backend, ops
from vdm_fast.ops import norm as ops_norm
from vdm_fast.reference.norm import group_norm_silu as reference

fused = torch.ops.vdm_fast.group_norm_silu
needs_cpp = pytest.mark.skipif(backend.cpu_kernels is None, reason="vdm_fast._C not built")
needs_triton = pytest.mark.skipif(not backend.HAS_TRITON, reason="triton is not installed")
# Each implementation's forward and backward callers (same signatures), and the module whose
# allocations the poisoned fixture fills with NaN.
IMPLS = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]


def _kernels(impl):
    if impl == "cpp":
        return ops_norm._group_norm_silu_cpu, ops_norm._group_norm_silu_backward_cpu, ops_norm
    import vdm_fast.kernels.norm as triton_norm
    return ops_norm._group_norm_silu_triton, ops_norm._group_norm_silu_backward_triton, triton_norm


def _inputs(B, C, H, W, dtype, cond):
    x = torch.randn(B, C, H, W, dtype=dtype) * 2 + 1  # an offset, as activations have
    weight, bias = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    return x, weight, bias, torch.randn(B, C, dtype=dtype) if cond else None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, groups", [((2, 8, 5, 7), 4), ((1, 32, 4, 4), 32), ((3, 16, 3, 3), 8)])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_kernels_match_reference(impl, dtype, shape, groups, silu, cond, layout, poisoned):
    forward, backward, module = _kernels(impl)
    poisoned(module)
    x, weight, bias, c = _inputs(*shape, dtype, cond)
    x = x.contiguous(memory_format=layout)
    dy = torch.randn(x.shape, dtype=dtype)  # NCHW whatever x's layout: the kernels adapt it
    y, mean, rstd = forward(x, weight, bias, c, groups, 1e-6, silu)
    dx, dw, db, dc = backward(dy, x, weight, bias, c, mean, rstd, groups, silu)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)] + ([c.clone().requires_grad_()] if cond else [])
    y_ref = reference(*leaves[:3], groups, 1e-6, silu, leaves[3] if cond else None)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    # Read in place and written in the input's layout: no NCHW copy of a channels_last input.
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)
    tol = RTOL[dtype] * 10
    for a, b, name in zip((y, dx, dw, db, dc), (y_ref, *grads_ref), ("y", "dx", "dweight", "dbias", "dcond")):
        # With one channel per group the conditioning add is normalised away: its true gradient
        # is zero and both sides are rounding noise, so the tolerance is set by dx's scale.
        atol = tol * grads_ref[0].abs().max().item() if name == "dcond" else 0.0
        assert_close(a, b, tol, name, atol=atol)
    if not cond:
        assert dc.numel() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_statistics_survive_a_large_mean(impl, layout, poisoned):
    """Activations offset far from zero: sum and sum of squares in float32 would cancel to a
    variance wrong by O(1) here; the kernels' statistics (Welford in Triton, two passes in
    double in C++) stay at float32 rounding of the mean."""
    forward, _, module = _kernels(impl)
    poisoned(module)
    x, weight, bias, _ = _inputs(2, 16, 6, 5, torch.float32, False)
    x = (x + 1000.0).contiguous(memory_format=layout)
    y, mean, rstd = forward(x, weight, bias, None, 4, 1e-6, False)
    exact = reference(x.double(), weight.double(), bias.double(), 4, 1e-6, False)
    groups = x.double().reshape(2, 4, -1)
    assert_close(mean, groups.mean(-1).float(), 1e-6, "mean")
    assert_close(rstd, (groups.var(-1, unbiased=False) + 1e-6).rsqrt().float(), 1e-4, "rstd")
    assert_close(y.double(), exact, 0.0, "y", atol=1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("impl, dtype", [pytest.param("cpp", torch.bfloat16, marks=needs_cpp),
                                         pytest.param("triton", torch.bfloat16, marks=needs_triton),
                                         pytest.param("triton", torch.float16, marks=needs_triton)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("silu, cond", [(True, True), (False, False)])
def test_kernels_read_low_precision_and_write_its_dtype(impl, dtype, layout, silu, cond, poisoned):
    """A bf16 (or, in Triton, float16) x with float32 weights, as autocast gives the op: output
    and dx in x's dtype and layout, float32 statistics and weight gradients, each within x's
    dtype's rounding of the float64 reference on the same rounded inputs."""
    forward, backward, module = _kernels(impl)
    poisoned(module)
    x, weight, bias, c = _inputs(3, 16, 5, 7, torch.float32, cond)
    x = x.to(dtype).contiguous(memory_format=layout)
    c = c.to(dtype) if cond else None
    dy = torch.randn(x.shape).to(dtype)
    y, mean, rstd = forward(x, weight, bias, c, 8, 1e-6, silu)
    dx, dw, db, dc = backward(dy, x, weight, bias, c, mean, rstd, 8, silu)
    assert y.dtype == dx.dtype == dtype and mean.dtype == dw.dtype == torch.float32
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)
    exact = [t.double().requires_grad_() for t in (x, weight, bias)] + ([c.double().requires_grad_()] if cond else [])
    y64 = reference(*exact[:3], 8, 1e-6, silu, exact[3] if cond else None)
    grads64 = torch.autograd.grad(y64, exact, dy.double())
    assert_close(y, y64, RTOL[dtype], "y")
    for a, b, name in zip((dx, dw, db, dc), grads64, ("dx", "dweight", "dbias", "dcond")):
        assert_close(a, b, RTOL[dtype] * 2, name)


@needs_cpp
def test_cpp_kernels_do_not_depend_on_the_thread_count():
    """Examples are independent work items and the weight gradients are summed over them in a
    fixed order: the same bits whatever the OpenMP thread count."""
    x, weight, bias, c = _inputs(5, 16, 4, 3, torch.float32, True)
    dy = torch.randn(x.shape)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mean, rstd = ops_norm._group_norm_silu_cpu(x, weight, bias, c, 4, 1e-6, True)
            results.append((y, *ops_norm._group_norm_silu_backward_cpu(dy, x, weight, bias, c, mean, rstd, 4, True)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_group_norm_opcheck():
    x, weight, bias, c = _inputs(2, 8, 3, 5, torch.float32, True)
    torch.library.opcheck(fused.default, (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
                                          c.requires_grad_(), 4, 1e-6, True))


def test_public_op_validates_and_matches_reference_on_cpu():
    x, weight, bias, c = _inputs(2, 8, 3, 5, torch.float32, True)
    assert_close(ops.group_norm_silu(x, weight, bias, 4, cond=c), reference(x, weight, bias, 4, 1e-6, True, c),
                 RTOL[torch.float32] * 10)
    with pytest.raises(ValueError, match="num_groups .3. must divide"):
        ops.group_norm_silu(x, weight, bias, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.group_norm_silu(x, weight[:4], bias, 4)
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 8\)"):
        ops.group_norm_silu(x, weight, bias, 4, cond=c[:, :4])
    with pytest.raises(ValueError, match="NCHW"):
        ops.group_norm_silu(x[0], weight, bias, 4)



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cuda_group_norm_matches_reference(dtype, layout):
    x, weight, bias, c = _inputs(8, 128, 32, 32, torch.float32, True)
    x = x.contiguous(memory_format=layout)
    dy = torch.randn_like(x)
    outs = []
    for fn, dev in ((ops.group_norm_silu, "cuda"), (reference, "cpu")):
        leaves = [t.to(dev).requires_grad_() for t in (x.to(dtype), weight, bias, c)]
        y = fn(leaves[0], leaves[1], leaves[2], 32, 1e-6, True, leaves[3])
        outs.append((y, *torch.autograd.grad(y, leaves, dy.to(dev, dtype))))
    for a, b in zip(*outs):
        assert_close(a.cpu().float(), b.float(), RTOL[dtype] * 10)
