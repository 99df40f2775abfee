"""The U-Net's attention block as fused ops (math: ``vdm_fast.reference.attention``; kernels:
``kernels/attention.py`` and ``kernels/norm.py``).

``x + proj_out(attention(GroupNorm(x)))``: the GroupNorm runs the fused norm kernel, the QKV
projection is one GEMM, the attention core is ``vdm_fast::flash_attention`` (online softmax,
log-sum-exp saved, probabilities recomputed in backward; the ``(HW)^2`` matrix never exists),
and the residual is the ``C`` operand of the output projection's GEMM (``addmm``), so it is
added in that GEMM's epilogue. Where ``vdm_fast.backend`` says so (CUDA tensors of float32,
bfloat16 or float16) this path runs; on the CPU the reference block runs in float32 (PyTorch's
own CPU kernels) and returns x's dtype; float64 and the reference backend run the reference.
Head dims the kernels cannot hold in registers (``kernels/attention_tiles.py``: per dtype, and
for float32 per torch's TF32 setting) take ``torch.nn.functional.scaled_dot_product_attention``
as the attention core.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm_fast import backend
from vdm_fast.kernels import attention_tiles
from vdm_fast import validate
from vdm_fast.ops._library import kernel_op
from vdm_fast.ops.norm import _group_norm_silu
from vdm_fast.reference import attention as ref

_triton = functools.partial(backend.triton_kernels, "attention")


def _flash_attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _triton().flash_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), scale)


_flash_attention = kernel_op("flash_attention", "attention", triton=_flash_attention_triton)


@_flash_attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _flash_attention_backward_triton(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().flash_attention_backward(do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                              o.contiguous(), lse, scale)


_flash_attention_backward = kernel_op("flash_attention_backward", "attention", triton=_flash_attention_backward_triton)


@_flash_attention_backward.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    if do is None:  # only the log-sum-exp was used: it carries no gradient
        return None, None, None, None
    dq, dk, dv = _flash_attention_backward(do, *ctx.saved_tensors, ctx.scale)
    return dq, dk, dv, None


_flash_attention.register_autograd(_backward, setup_context=_setup)


def _attention_block_fused(x, norm_weight, norm_bias, w_qkv, b_qkv, w_out, b_out, num_heads, num_groups, eps):
    B, C, H, W = x.shape
    N, d = H * W, C // num_heads
    h = _group_norm_silu(x, norm_weight, norm_bias, None, num_groups, float(eps), False)[0]
    qkv = F.linear(h.flatten(2).transpose(1, 2), w_qkv, b_qkv)  # [B, N, 3C]

    def heads(t):  # [B, N, C] -> [B * heads, N, d]
        return t.reshape(B, N, num_heads, d).transpose(1, 2).reshape(B * num_heads, N, d)

    q, k, v = (heads(t) for t in qkv.chunk(3, dim=-1))
    if attention_tiles.supported(q.dtype, d):
        a = _flash_attention(q, k, v, 1.0 / math.sqrt(d))[0]
    else:  # a head dim the kernels would spill on (kernels/attention_tiles.py): torch's fused attention
        a = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))
    a = a.reshape(B, num_heads, N, d).transpose(1, 2).reshape(B * N, C)
    residual = x.flatten(2).transpose(1, 2).reshape(B * N, C) + b_out
    out = torch.addmm(residual, a, w_out.t())  # the residual is addmm's C operand: the epilogue adds it
    return out.reshape(B, N, C).transpose(1, 2).reshape(B, C, H, W)


def attention_block(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, w_qkv: Tensor, b_qkv: Tensor,
                    w_out: Tensor, b_out: Tensor, num_heads: int = 1, num_groups: int = 32,
                    eps: float = 1e-6) -> Tensor:
    """``x + proj_out(attention(GroupNorm(x)))`` over the ``H * W`` tokens of NCHW ``x``, the
    official ``AttnBlock``; ``w_qkv [3C, C]``, ``w_out [C, C]`` in ``Linear`` layout, softmax
    scale ``1 / sqrt(C / num_heads)``."""
    validate.tensor("x", x, floating=True)
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW [B, C, H, W], got shape {tuple(x.shape)}")
    C = x.shape[1]
    validate.positive_int("num_heads", num_heads)
    validate.positive_int("num_groups", num_groups)
    validate.finite_number("eps", eps, positive=True)
    if C % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide the channels of x ({C})")
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channels of x ({C})")
    weights = validate.parameters([("w_qkv", w_qkv, (3 * C, C)), ("b_qkv", b_qkv, (3 * C,)), ("w_out", w_out, (C, C)),
                                   ("b_out", b_out, (C,)), ("norm_weight", norm_weight, (C,)),
                                   ("norm_bias", norm_bias, (C,))], "x", x)
    impl = backend.implementation("attention", x.device, x.dtype)
    if impl == "triton":
        return _attention_block_fused(x, norm_weight, norm_bias, w_qkv, b_qkv, w_out, b_out, num_heads,
                                      num_groups, eps)
    params = (norm_weight, norm_bias, w_qkv, b_qkv, w_out, b_out)
    # "torch" (CPU): in float32, autocast or not (vdm_fast.backend.KERNELS says why); float32 input
    # outside autocast is the reference as it is, without the casts and the autocast switch.
    if impl == "torch" and not (x.dtype == weights == torch.float32 and not torch.is_autocast_enabled("cpu")):
        with torch.autocast(x.device.type, enabled=False):
            y = ref.attention_block(x.float(), *(p.float() for p in params), num_heads, num_groups, eps)
        return y.to(x.dtype)
    return ref.attention_block(x, *params, num_heads, num_groups, eps)
