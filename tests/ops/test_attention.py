"""The attention block: the Triton flash-attention kernels and the fused block (interpreted on
the CPU where no GPU exists) against the reference, and the fused U-Net against the reference
U-Net."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import RTOL, assert_close

from vdm_fast import backend, ops
from vdm_fast import nn as vnn
from vdm_fast.reference.attention import attention_block as reference

triton_attention = pytest.importorskip("vdm_fast.kernels.attention", reason="triton is not installed")
from vdm_fast.ops import attention as ops_attention  # noqa: E402


@pytest.mark.parametrize("BH, N, d", [(2, 16, 8), (3, 35, 32), (1, 70, 40)])  # N not a block multiple
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_matches_sdpa(BH, N, d, dtype, poisoned):
    poisoned(triton_attention)
    q, k, v = (torch.randn(BH, N, d).to(dtype) for _ in range(3))
    do = torch.randn(BH, N, d).to(dtype)
    o, lse = torch.ops.vdm_fast.flash_attention(q, k, v, 1 / math.sqrt(d))
    grads = torch.ops.vdm_fast.flash_attention_backward(do, q, k, v, o, lse, 1 / math.sqrt(d))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_o = F.scaled_dot_product_attention(*leaves)
    ref_grads = torch.autograd.grad(ref_o, leaves, do.double())
    assert o.dtype == dtype
    assert_close(o, ref_o, RTOL[dtype] * 10, "o")
    assert_close(lse, torch.logsumexp(leaves[0] @ leaves[1].transpose(1, 2) / math.sqrt(d), -1), RTOL[dtype] * 10)
    for a, b, name in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_close(a, b, RTOL[dtype] * 20, name)


def _block_params(C, dtype=torch.float32):
    return [torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype), torch.randn(3 * C, C, dtype=dtype) / math.sqrt(C),
            torch.randn(3 * C, dtype=dtype), torch.randn(C, C, dtype=dtype) / math.sqrt(C), torch.randn(C, dtype=dtype)]


@pytest.mark.parametrize("shape, heads, groups", [((2, 8, 4, 4), 1, 4), ((1, 32, 5, 7), 2, 32), ((2, 16, 5, 7), 1, 8)])
def test_fused_attention_block_matches_reference(shape, heads, groups, poisoned):
    poisoned(triton_attention)
    x = torch.randn(shape)
    params = _block_params(shape[1])
    dy = torch.randn(shape)
    results = []
    for fn in (ops_attention._attention_block_fused, reference):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        y = fn(*leaves, heads, groups, 1e-6)
        results.append((y, *torch.autograd.grad(y, leaves, dy)))
    for a, b, name in zip(*results, ("y", "dx", "dnorm_w", "dnorm_b", "dw_qkv", "db_qkv", "dw_out", "db_out")):
        assert_close(a, b, RTOL[torch.float32] * 20, name)


def test_flash_attention_opcheck():
    q, k, v = (torch.randn(2, 19, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.vdm_fast.flash_attention.default, (q, k, v, 0.25))


def test_fused_unet_matches_reference_unet(monkeypatch):
    """The U-Net with its GroupNorms and attention on the fused kernels, against the same U-Net
    (same state_dict) on the reference: outputs and every parameter's gradient."""
    torch.manual_seed(0)
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=1, dropout=0.0, attention="all")
    for p in net.parameters():  # off the zero init, so every block matters
        p.data.add_(0.1 * torch.randn_like(p))
    z, gamma = torch.randn(2, 1, 4, 4), torch.tensor([-3.0, 1.0])

    def run():
        net.zero_grad()
        out = net(z, gamma)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    with backend.use("reference"):
        reference_out, reference_grads = run()

    # On the CPU the attention block runs PyTorch's kernels: send it to the Triton kernels, which
    # the interpreter runs (their ops are registered for the CPU under it); the GroupNorms run
    # the C++ kernels.
    monkeypatch.setitem(backend.KERNELS["attention"], "cpu", "triton")
    with backend.use("reference"):  # the switch reaches every block
        assert_close(run()[0], reference_out, 0.0, "reference ops")
    fused_out, fused_grads = run()
    assert_close(fused_out, reference_out, 1e-4, "output")
    # Some parameters (e.g. dense0, whose effect a GroupNorm later cancels almost entirely) have
    # gradients of float32 rounding size: the floor is set by the largest gradient.
    atol = 1e-4 * max(g.abs().max().item() for g in reference_grads.values())
    for name, g in reference_grads.items():
        assert_close(fused_grads[name], g, 1e-3, name, atol=atol)


def test_attention_block_rejects():
    x = torch.randn(2, 8, 4, 4)
    params = _block_params(8)
    with pytest.raises(ValueError, match="num_heads .3. must divide"):
        ops.attention_block(x, *params, num_heads=3, num_groups=4)
    with pytest.raises(ValueError, match=r"w_qkv must have shape \(24, 8\)"):
        ops.attention_block(x, params[0], params[1], params[2][:8], *params[3:], num_groups=4)
    assert torch.equal(ops.attention_block(x, *params, num_groups=4), reference(x, *params, 1, 4))



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_block_runs_in_float32_under_low_precision(dtype):
    """On the CPU a bf16 or float16 block, and a float32 one under autocast (as the trainer runs
    it), computes in float32: its output is the float32 block's on the same inputs, rounded once
    to x's dtype, and its gradients are the float32 gradients rounded to each input's dtype. A
    block that ran its products in ``dtype`` misses those by that dtype's rounding. The reference
    backend runs the reference in ``dtype``."""
    torch.manual_seed(0)
    x, params, dy = torch.randn(4, 32, 6, 6), _block_params(32), torch.randn(4, 32, 6, 6)
    low = [t.to(dtype).requires_grad_() for t in (x, *params)]
    y = ops.attention_block(*low, num_groups=8)
    rounded = [t.detach().float().requires_grad_() for t in low]
    y32 = ops.attention_block(*rounded, num_groups=8)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))
    for g, g32 in zip(torch.autograd.grad(y, low, dy.to(dtype)), torch.autograd.grad(y32, rounded, dy.to(dtype).float())):
        assert g.dtype == dtype and torch.equal(g, g32.to(dtype))
    with backend.use("reference"):
        assert torch.equal(ops.attention_block(*low, num_groups=8), reference(*low, 1, 8))

    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    y32 = ops.attention_block(*leaves, num_groups=8)
    grads32 = torch.autograd.grad(y32, leaves, dy)
    with torch.autocast("cpu", dtype=dtype):
        y_auto = ops.attention_block(*leaves, num_groups=8)
    assert y_auto.dtype == torch.float32
    assert_close(y_auto, y32, RTOL[torch.float32], "y under autocast")
    for g, g32 in zip(torch.autograd.grad(y_auto, leaves, dy), grads32):
        assert_close(g, g32, RTOL[torch.float32], "a gradient under autocast")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (1, 512): past the kernels' head dims, the block's attention core is SDPA (kernels/attention_tiles.py).
@pytest.mark.parametrize("heads, d", [(1, 128), (2, 64), (4, 64), (8, 32), (1, 256), (1, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_attention_block_matches_reference(heads, d, dtype):
    """On the card the products run on the tensor cores in the input dtype (bf16) or in full
    float32: both against the float32 reference on the same (rounded) inputs."""
    C = heads * d
    x = torch.randn(4, C, 15, 15).to(dtype)  # 225 tokens: not a multiple of the block size
    params = [p.to(dtype) for p in _block_params(C)]
    dy = torch.randn_like(x)
    outs = []
    for dev, cast in (("cuda", dtype), ("cpu", torch.float32)):
        leaves = [t.to(dev, cast).requires_grad_() for t in (x, *params)]
        y = ops.attention_block(*leaves, num_heads=heads, num_groups=32)
        outs.append((y, *torch.autograd.grad(y, leaves, dy.to(dev, cast))))
    tol = RTOL[torch.float32] * 50 if dtype == torch.float32 else RTOL[dtype] * 5
    for a, b in zip(*outs):
        assert a.dtype == dtype
        assert_close(a.cpu(), b, tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_unet_matches_reference_under_autocast(dtype):
    """The U-Net as training runs it on a card: channels_last, autocast, every GroupNorm and
    attention block on the fused kernels, against the same net on the reference ops."""
    torch.manual_seed(0)
    net = vnn.ScoreUNet(in_channels=3, n_embd=64, n_layer=1, dropout=0.0, attention="all").cuda()
    for p in net.parameters():  # off the zero init, so every block matters
        p.data.add_(0.05 * torch.randn_like(p))
    net = net.to(memory_format=torch.channels_last)
    z = torch.randn(4, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    gamma = torch.tensor([-10.0, -3.0, 0.0, 4.0], device="cuda")
    results = {}
    for impl in ("reference", "auto"):
        net.zero_grad()
        with backend.use(impl), torch.autocast("cuda", dtype=dtype):
            out = net(z, gamma)
        out.float().square().sum().backward()
        results[impl] = (out.float(), {n: p.grad.float().clone() for n, p in net.named_parameters()})
    (ref_out, ref_grads), (out, grads) = results["reference"], results["auto"]
    assert_close(out, ref_out, RTOL[dtype] * 3, "output")
    atol = RTOL[dtype] * max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert_close(grads[name], g, RTOL[dtype] * 5, name, atol=atol)
