"""GroupNorm (+ swish, + conditioning add) of the U-Net as a fused op (math:
``vdm_fast.reference.norm``; kernels: ``kernels/norm.py``).

``vdm_fast::group_norm_silu`` has Triton kernels only (registered for CUDA, and for CPU tensors
under ``TRITON_INTERPRET=1``, for the tests). On the CPU ``vdm_fast.backend`` sends it to
PyTorch's own group_norm and silu kernels in x's dtype; the reference backend runs the reference.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm_fast import backend
from vdm_fast.ops import _validate
from vdm_fast.ops._library import kernel_op
from vdm_fast.reference import norm as ref

_triton = functools.partial(backend.triton_kernels, "norm")


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels read ``x`` in, and write ``y`` and ``dx`` in: channels_last where
    ``x`` has it (no copy), else NCHW."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _group_norm_silu_triton(x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor], num_groups: int,
                            eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    cond = None if cond is None else cond.contiguous()
    return _triton().group_norm_silu_forward(x.contiguous(memory_format=_memory_format(x)), weight.contiguous(),
                                             bias.contiguous(), cond, num_groups, eps, silu)


_group_norm_silu = kernel_op("group_norm_silu", "norm", triton=_group_norm_silu_triton)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_group_norm_silu.register_fake
def _(x, weight, bias, cond, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=_memory_format(x)), stats, torch.empty_like(stats)


def _group_norm_silu_backward_triton(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor],
                                     mean: Tensor, rstd: Tensor, num_groups: int,
                                     silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dcond)``; ``dcond`` is empty without conditioning."""
    cond = None if cond is None else cond.contiguous()
    layout = _memory_format(x)
    dx, dw, db, dcond = _triton().group_norm_silu_backward(dy.contiguous(memory_format=layout),
                                                           x.contiguous(memory_format=layout), weight.contiguous(),
                                                           bias.contiguous(), cond, mean, rstd, num_groups, silu)
    return dx, dw, db, dcond if dcond is not None else x.new_empty(0)


_group_norm_silu_backward = kernel_op("group_norm_silu_backward", "norm", triton=_group_norm_silu_backward_triton)


@_group_norm_silu_backward.register_fake
def _(dy, x, weight, bias, cond, mean, rstd, num_groups, silu):
    dcond = torch.empty_like(cond) if cond is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=_memory_format(x)), torch.empty_like(weight), \
        torch.empty_like(bias), dcond


def _setup(ctx, inputs, output):
    x, weight, bias, cond, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, cond, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, cond, mean, rstd = ctx.saved_tensors
    dx, dw, db, dcond = _group_norm_silu_backward(dy, x, weight, bias, cond, mean, rstd, ctx.num_groups, ctx.silu)
    return dx, dw, db, (dcond if cond is not None else None), None, None, None


_group_norm_silu.register_autograd(_backward, setup_context=_setup)


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int = 32, eps: float = 1e-6,
                    silu: bool = True, cond: Optional[Tensor] = None) -> Tensor:
    """``silu(GroupNorm(x + cond[:, :, None, None]))`` over ``x [B, C, H, W]``, NCHW or channels_last
    (the result keeps the layout; ``silu``, ``cond`` optional),
    statistics in float32 (float64 for float64 input), output in ``x``'s dtype."""
    _validate.tensor("x", x, floating=True)
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    _validate.positive_int("num_groups", num_groups)
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channels of x ({C})")
    _validate.finite_number("eps", eps, positive=True)
    _validate.parameters([("weight", weight, (C,)), ("bias", bias, (C,))], "x", x)
    if cond is not None:
        _validate.tensor("cond", cond, floating=True)
        if cond.shape != (B, C):
            raise ValueError(f"cond must have shape ({B}, {C}), got {tuple(cond.shape)}")
        _validate.same_device("cond", cond, "x", x)
    impl = backend.implementation("norm", x.device, x.dtype)
    if impl == "triton":
        return _group_norm_silu(x, weight, bias, cond, num_groups, float(eps), bool(silu))[0]
    if impl == "torch":
        return _group_norm_silu_torch(x, weight, bias, num_groups, eps, silu, cond)
    return ref.group_norm_silu(x, weight, bias, num_groups, eps, silu, cond)


def _group_norm_silu_torch(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, silu: bool,
                           cond: Optional[Tensor]) -> Tensor:
    """PyTorch's CPU kernels in ``x``'s dtype: the reference's math, except that a bf16 or float16
    ``x`` is normalised in its own dtype (float32 statistics inside torch's kernel, float32
    weights) and rounded before the swish as well as after it (vdm_fast.backend.KERNELS says why)."""
    if cond is not None:
        x = x + cond[:, :, None, None].to(x.dtype)
    params = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = F.group_norm(x, num_groups, weight.to(params), bias.to(params), eps)
    return F.silu(h) if silu else h
