"""GroupNorm (+ swish, + conditioning add) of the U-Net as a fused op (math:
``vdm_fast.reference.norm``; kernels: ``csrc/norm.*`` and ``kernels/norm.py``).

``vdm_fast::group_norm_silu`` runs the C++ kernels on the CPU (float32, float64, bfloat16) and
the Triton kernels on CUDA (the tests run the Triton callers below on CPU tensors under
``TRITON_INTERPRET=1``); one pass reads ``x`` in its layout (NCHW or channels_last) and dtype,
with float32 statistics and weights, and writes ``y`` in both.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from vdm_fast import backend
from vdm_fast import validate
from vdm_fast.ops._library import cast, dtype_name, kernel_op
from vdm_fast.reference import norm as ref

_C = backend.cpu_kernels
_triton = functools.partial(backend.triton_kernels, "norm")


def _in_layout(x: Tensor) -> tuple[Tensor, torch.memory_format]:
    """``x`` dense in the layout the kernels read it in, and write ``y`` and ``dx`` in (so
    ``empty_like`` of it has that layout): channels_last where ``x`` has it (no copy), else NCHW.
    No call where ``x`` already is, the common case."""
    if x.is_contiguous():
        return x, torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last
    return x.contiguous(), torch.contiguous_format


def _like_layout(t: Tensor, layout: torch.memory_format) -> Tensor:
    """``t`` (the upstream gradient) dense in ``layout``, as ``x`` is."""
    if layout == torch.contiguous_format:
        return t.contiguous()
    return t if t.is_contiguous(memory_format=layout) else t.contiguous(memory_format=layout)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cpu_args(x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor]):
    """The C++ kernels' operands: x in its layout, cond in x's dtype, the weights in the
    statistics' dtype."""
    x, layout = _in_layout(x)
    stats = _stats_dtype(x)
    return (x, None if cond is None else cast(cond, x.dtype).contiguous(), cast(weight, stats).contiguous(),
            cast(bias, stats).contiguous(), layout)


def _group_norm_silu_cpu(x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor], num_groups: int,
                         eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    x, cond, w, b, layout = _cpu_args(x, weight, bias, cond)
    B, C, H, W = x.shape
    # Allocated the cheapest ways torch's Python API offers (no keyword or tuple arguments to
    # parse): y in x's layout, the statistics in the weights' dtype and device.
    y = torch.empty_like(x)
    mean = w.new_empty(B, num_groups)
    rstd = torch.empty_like(mean)
    _C.group_norm_forward_cpu(x.data_ptr(), 0 if cond is None else cond.data_ptr(), w.data_ptr(), b.data_ptr(),
                              y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), B, C, H * W, num_groups, eps, silu,
                              layout == torch.channels_last, dtype_name(x.dtype))
    return y, mean, rstd


def _group_norm_silu_triton(x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor], num_groups: int,
                            eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    cond = None if cond is None else cond.contiguous()
    return _triton().group_norm_silu_forward(_in_layout(x)[0], weight.contiguous(), bias.contiguous(), cond,
                                             num_groups, eps, silu)


_group_norm_silu = kernel_op("group_norm_silu", "norm", cpu=_group_norm_silu_cpu, triton=_group_norm_silu_triton)


@_group_norm_silu.register_fake
def _(x, weight, bias, cond, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(_in_layout(x)[0]), stats, torch.empty_like(stats)


def _group_norm_silu_backward_cpu(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor],
                                  mean: Tensor, rstd: Tensor, num_groups: int,
                                  silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dcond)`` in the inputs' dtypes; ``dcond`` is empty without conditioning."""
    xc, condc, w, b, layout = _cpu_args(x, weight, bias, cond)
    B, C, H, W = x.shape
    dy = _like_layout(cast(dy, x.dtype), layout)
    dx = torch.empty_like(xc)
    dw, db = torch.empty_like(w), torch.empty_like(b)
    dcond = x.new_empty(0) if cond is None else torch.empty_like(condc)
    _C.group_norm_backward_cpu(dy.data_ptr(), xc.data_ptr(), 0 if cond is None else condc.data_ptr(), w.data_ptr(),
                               b.data_ptr(), mean.contiguous().data_ptr(), rstd.contiguous().data_ptr(), dx.data_ptr(),
                               dw.data_ptr(), db.data_ptr(), 0 if cond is None else dcond.data_ptr(), B, C, H * W,
                               num_groups, silu, layout == torch.channels_last, dtype_name(x.dtype))
    if cond is not None:
        dcond = cast(dcond, cond.dtype)
    return dx, cast(dw, weight.dtype), cast(db, bias.dtype), dcond


def _group_norm_silu_backward_triton(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, cond: Optional[Tensor],
                                     mean: Tensor, rstd: Tensor, num_groups: int,
                                     silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dcond)``; ``dcond`` is empty without conditioning."""
    cond = None if cond is None else cond.contiguous()
    x, layout = _in_layout(x)
    dx, dw, db, dcond = _triton().group_norm_silu_backward(_like_layout(dy, layout), x, weight.contiguous(),
                                                           bias.contiguous(), cond, mean, rstd, num_groups, silu)
    return dx, dw, db, dcond if dcond is not None else x.new_empty(0)


_group_norm_silu_backward = kernel_op("group_norm_silu_backward", "norm", cpu=_group_norm_silu_backward_cpu,
                                      triton=_group_norm_silu_backward_triton)


@_group_norm_silu_backward.register_fake
def _(dy, x, weight, bias, cond, mean, rstd, num_groups, silu):
    dcond = torch.empty_like(cond) if cond is not None else x.new_empty(0)
    return torch.empty_like(_in_layout(x)[0]), torch.empty_like(weight), torch.empty_like(bias), dcond


def _setup(ctx, inputs, output):
    x, weight, bias, cond, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, cond, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # only the statistics were used: they carry no gradient
        return None, None, None, None, None, None, None
    x, weight, bias, cond, mean, rstd = ctx.saved_tensors
    dx, dw, db, dcond = _group_norm_silu_backward(dy, x, weight, bias, cond, mean, rstd, ctx.num_groups, ctx.silu)
    return dx, dw, db, (dcond if cond is not None else None), None, None, None


_group_norm_silu.register_autograd(_backward, setup_context=_setup)


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int = 32, eps: float = 1e-6,
                    silu: bool = True, cond: Optional[Tensor] = None) -> Tensor:
    """``silu(GroupNorm(x + cond[:, :, None, None]))`` over ``x [B, C, H, W]``, NCHW or channels_last
    (the result keeps the layout; ``silu``, ``cond`` optional),
    statistics in float32 (float64 for float64 input), output in ``x``'s dtype."""
    validate.tensor("x", x, floating=True)
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    validate.positive_int("num_groups", num_groups)
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channels of x ({C})")
    validate.finite_number("eps", eps, positive=True)
    validate.parameters([("weight", weight, (C,)), ("bias", bias, (C,))], "x", x)
    if cond is not None:
        validate.tensor("cond", cond, floating=True)
        if cond.shape != (B, C):
            raise ValueError(f"cond must have shape ({B}, {C}), got {tuple(cond.shape)}")
        validate.same_device("cond", cond, "x", x)
    if backend.implementation("norm", x.device, x.dtype) != "reference":
        return _group_norm_silu(x, weight, bias, cond, num_groups, float(eps), bool(silu))[0]
    return ref.group_norm_silu(x, weight, bias, num_groups, eps, silu, cond)
