"""GroupNorm (+ swish, + conditioning): the Triton kernels (interpreted on the CPU where no GPU
exists) against the reference, forward and backward."""

import pytest
import torch
from helpers import RTOL, assert_close

from vdm_fast import backend, ops
from vdm_fast.reference.norm import group_norm_silu as reference

triton_norm = pytest.importorskip("vdm_fast.kernels.norm", reason="triton is not installed")
fused = torch.ops.vdm_fast.group_norm_silu


def _inputs(B, C, H, W, dtype, cond):
    x = torch.randn(B, C, H, W, dtype=dtype) * 2 + 1  # an offset, as activations have
    weight, bias = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    return x, weight, bias, torch.randn(B, C, dtype=dtype) if cond else None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, groups", [((2, 8, 5, 7), 4), ((1, 32, 4, 4), 32), ((3, 16, 3, 3), 8)])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_group_norm_matches_reference(dtype, shape, groups, silu, cond, layout, poisoned):
    poisoned(triton_norm)
    x, weight, bias, c = _inputs(*shape, dtype, cond)
    x = x.contiguous(memory_format=layout)
    dy = torch.randn(x.shape, dtype=dtype)  # NCHW whatever x's layout: the op adapts it
    results = []
    for fn in (lambda *a: fused(*a[:3], a[3], groups, 1e-6, silu)[0],
               lambda *a: reference(*a[:3], groups, 1e-6, silu, a[3])):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)] + ([c.clone().requires_grad_()] if cond else [None])
        y = fn(*leaves)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
        results.append((y, *grads))
    # Read in place and written in the input's layout: no NCHW copy of a channels_last input.
    assert results[0][0].is_contiguous(memory_format=layout) and results[0][1].is_contiguous(memory_format=layout)
    tol = RTOL[dtype] * 10
    for a, b, name in zip(*results, ("y", "dx", "dweight", "dbias", "dcond")):
        # With one channel per group the conditioning add is normalised away: its true gradient
        # is zero and both sides are rounding noise, so the tolerance is set by dx's scale.
        atol = tol * results[1][1].abs().max().item() if name == "dcond" else 0.0
        assert_close(a, b, tol, name, atol=atol)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_group_norm_statistics_survive_a_large_mean(layout, poisoned):
    """Activations offset far from zero: sum and sum of squares in float32 would cancel to a
    variance wrong by O(1) here; the Welford statistics stay at float32 rounding of the mean."""
    poisoned(triton_norm)
    x, weight, bias, _ = _inputs(2, 16, 6, 5, torch.float32, False)
    x = (x + 1000.0).contiguous(memory_format=layout)
    y, mean, rstd = fused(x, weight, bias, None, 4, 1e-6, False)
    exact = reference(x.double(), weight.double(), bias.double(), 4, 1e-6, False)
    groups = x.double().reshape(2, 4, -1)
    assert_close(mean, groups.mean(-1).float(), 1e-6, "mean")
    assert_close(rstd, (groups.var(-1, unbiased=False) + 1e-6).rsqrt().float(), 1e-4, "rstd")
    assert_close(y.double(), exact, 0.0, "y", atol=1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_group_norm_reads_low_precision_and_writes_its_dtype(dtype, layout, poisoned):
    poisoned(triton_norm)
    x, weight, bias, c = _inputs(2, 8, 4, 4, torch.float32, True)
    x = x.to(dtype).contiguous(memory_format=layout)
    y = fused(x, weight, bias, c.to(dtype), 4, 1e-6, True)[0]
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    assert_close(y, reference(x.float(), weight, bias, 4, 1e-6, True, c.to(dtype).float()), RTOL[dtype])


def test_fused_group_norm_opcheck():
    x, weight, bias, c = _inputs(2, 8, 3, 5, torch.float32, True)
    torch.library.opcheck(fused.default, (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
                                          c.requires_grad_(), 4, 1e-6, True))


def test_public_op_validates_and_matches_reference_on_cpu():
    x, weight, bias, c = _inputs(2, 8, 3, 5, torch.float32, True)
    assert torch.equal(ops.group_norm_silu(x, weight, bias, 4, cond=c), reference(x, weight, bias, 4, 1e-6, True, c))
    with pytest.raises(ValueError, match="num_groups .3. must divide"):
        ops.group_norm_silu(x, weight, bias, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.group_norm_silu(x, weight[:4], bias, 4)
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 8\)"):
        ops.group_norm_silu(x, weight, bias, 4, cond=c[:, :4])
    with pytest.raises(ValueError, match="NCHW"):
        ops.group_norm_silu(x[0], weight, bias, 4)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("silu, cond", [(True, True), (False, False)])
def test_cpu_group_norm_in_low_precision_matches_float64_reference(dtype, silu, cond):
    """On the CPU a bf16 or float16 x runs PyTorch's group_norm in x's dtype (float32 weights,
    float32 statistics inside), without the reference's casts: the output and every gradient in
    the input's dtype, within that dtype's rounding of the float64 reference on the same rounded
    inputs. Under autocast (as the trainer runs it) the same."""
    x, weight, bias, c = _inputs(3, 16, 5, 7, torch.float32, cond)
    leaves = [x.to(dtype).requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
    if cond:
        leaves.append(c.to(dtype).requires_grad_())
    dy = torch.randn(x.shape).to(dtype)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    y64 = reference(*exact[:3], 8, 1e-6, silu, exact[3] if cond else None)
    grads64 = torch.autograd.grad(y64, exact, dy.double())
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = ops.group_norm_silu(*leaves[:3], 8, silu=silu, cond=leaves[3] if cond else None)
        assert y.dtype == dtype
        assert_close(y, y64, RTOL[dtype], "y")
        for g, leaf, g64, name in zip(torch.autograd.grad(y, leaves, dy), leaves, grads64,
                                      ("dx", "dweight", "dbias", "dcond")):
            assert g.dtype == leaf.dtype
            assert_close(g, g64, RTOL[dtype] * 2, name)
    with backend.use("reference"):
        args = (*leaves[:3], 8, 1e-6, silu, leaves[3] if cond else None)
        assert torch.equal(ops.group_norm_silu(*args[:4], silu=silu, cond=args[6]), reference(*args))

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
