"""Triton kernels of GroupNorm (+ swish, + the ResNet block's per-channel conditioning add)
(math: ``vdm_fast.reference.norm.group_norm_silu``).

Layout: NCHW contiguous, so a group's ``C/G`` channels of ``H*W`` values are one contiguous
span. One program per (example, group):

- forward: pass 1 sums the span for the mean and variance (float32, float64 for float64
  input); pass 2 normalises, scales, shifts, applies swish and stores. ``mean`` and ``rstd``
  (``[B, G]``) are saved for the backward.
- backward: pass 1 recomputes the normalised values and sums, per channel, the two terms of
  the weight and bias gradients (written as ``[B, C]`` partials and summed over the batch
  afterwards: deterministic, no atomics) and, per group, the two means of the input gradient;
  pass 2 writes the input gradient (and, with conditioning, its per-channel sums).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _load_channel(x_ptr, cond_ptr, b, c, C, HW, start, offs, HAS_COND: tl.constexpr, ACC: tl.constexpr):
    mask = offs < HW
    v = tl.load(x_ptr + (b * C + c) * HW + start + offs, mask=mask, other=0.0).to(ACC)
    if HAS_COND:
        v += tl.load(cond_ptr + b * C + c).to(ACC)
    return v, mask


@triton.jit
def _gn_fwd(x_ptr, w_ptr, b_ptr, cond_ptr, y_ptr, mean_ptr, rstd_ptr, C, HW, G, eps,
            HAS_COND: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b, g = tl.program_id(0), tl.program_id(1)
    cpg = C // G
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=ACC)
    total_sq = tl.zeros((BLOCK,), dtype=ACC)
    for k in range(0, cpg):
        c = g * cpg + k
        for start in range(0, HW, BLOCK):
            v, mask = _load_channel(x_ptr, cond_ptr, b, c, C, HW, start, offs + 0, HAS_COND, ACC)
            v = tl.where(mask, v, 0.0)
            total += v
            total_sq += v * v
    n = cpg * HW
    mean = tl.sum(total, axis=0) / n
    var = tl.maximum(tl.sum(total_sq, axis=0) / n - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + b * G + g, mean)
    tl.store(rstd_ptr + b * G + g, rstd)
    for k in range(0, cpg):
        c = g * cpg + k
        wc = tl.load(w_ptr + c).to(ACC)
        bc = tl.load(b_ptr + c).to(ACC)
        for start in range(0, HW, BLOCK):
            v, mask = _load_channel(x_ptr, cond_ptr, b, c, C, HW, start, offs + 0, HAS_COND, ACC)
            out = (v - mean) * rstd * wc + bc
            if SILU:
                out = out * tl.sigmoid(out)
            tl.store(y_ptr + (b * C + c) * HW + start + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, C, HW, start, offs, mask, SILU: tl.constexpr,
              ACC: tl.constexpr):
    """The normalised value and the gradient reaching the affine output (before swish)."""
    xhat = (v - mean) * rstd
    dy = tl.load(dy_ptr + (b * C + c) * HW + start + offs, mask=mask, other=0.0).to(ACC)
    if SILU:
        pre = xhat * wc + bc
        s = tl.sigmoid(pre)
        dy = dy * s * (1.0 + pre * (1.0 - s))
    return xhat, tl.where(mask, dy, 0.0)


@triton.jit
def _gn_bwd(dy_ptr, x_ptr, w_ptr, b_ptr, cond_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, dcond_ptr,
            C, HW, G, HAS_COND: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b, g = tl.program_id(0), tl.program_id(1)
    cpg = C // G
    offs = tl.arange(0, BLOCK)
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)
    sum_dxhat = tl.zeros((BLOCK,), dtype=ACC)
    sum_dxhat_xhat = tl.zeros((BLOCK,), dtype=ACC)
    for k in range(0, cpg):
        c = g * cpg + k
        wc = tl.load(w_ptr + c).to(ACC)
        bc = tl.load(b_ptr + c).to(ACC)
        dw = tl.zeros((BLOCK,), dtype=ACC)
        dbias = tl.zeros((BLOCK,), dtype=ACC)
        for start in range(0, HW, BLOCK):
            v, mask = _load_channel(x_ptr, cond_ptr, b, c, C, HW, start, offs + 0, HAS_COND, ACC)
            xhat, dpre = _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, C, HW, start, offs, mask, SILU, ACC)
            xhat = tl.where(mask, xhat, 0.0)
            dw += dpre * xhat
            dbias += dpre
            sum_dxhat += dpre * wc
            sum_dxhat_xhat += dpre * wc * xhat
        tl.store(dw_ptr + b * C + c, tl.sum(dw, axis=0))
        tl.store(db_ptr + b * C + c, tl.sum(dbias, axis=0))
    n = cpg * HW
    m1 = tl.sum(sum_dxhat, axis=0) / n
    m2 = tl.sum(sum_dxhat_xhat, axis=0) / n
    for k in range(0, cpg):
        c = g * cpg + k
        wc = tl.load(w_ptr + c).to(ACC)
        bc = tl.load(b_ptr + c).to(ACC)
        dsum = tl.zeros((BLOCK,), dtype=ACC)
        for start in range(0, HW, BLOCK):
            v, mask = _load_channel(x_ptr, cond_ptr, b, c, C, HW, start, offs + 0, HAS_COND, ACC)
            xhat, dpre = _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, C, HW, start, offs, mask, SILU, ACC)
            dx = rstd * (dpre * wc - m1 - xhat * m2)
            tl.store(dx_ptr + (b * C + c) * HW + start + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dsum += tl.where(mask, dx, 0.0)
        if HAS_COND:
            tl.store(dcond_ptr + b * C + c, tl.sum(dsum, axis=0))


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _block(HW: int) -> int:
    return min(BLOCK, triton.next_power_of_2(HW))


def group_norm_silu_forward(x, weight, bias, cond, num_groups, eps, silu):
    """``(y, mean, rstd)``; ``x`` NCHW contiguous, ``cond`` ``[B, C]`` or None."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.empty((B, num_groups), device=x.device, dtype=stats_dtype)
    rstd = torch.empty_like(mean)
    _gn_fwd[(B, num_groups)](x, weight, bias, cond if cond is not None else x, y, mean, rstd, C, H * W,
                             num_groups, eps, HAS_COND=cond is not None, SILU=silu, ACC=_acc(x),
                             BLOCK=_block(H * W))
    return y, mean, rstd


def group_norm_silu_backward(dy, x, weight, bias, cond, mean, rstd, num_groups, silu):
    """``(dx, dweight, dbias, dcond)``; ``dcond`` is None without conditioning."""
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    stats_dtype = mean.dtype
    dw = torch.empty((B, C), device=x.device, dtype=stats_dtype)
    db = torch.empty_like(dw)
    dcond = torch.empty_like(dw) if cond is not None else None
    _gn_bwd[(B, num_groups)](dy, x, weight, bias, cond if cond is not None else x, mean, rstd, dx, dw, db,
                             dcond if dcond is not None else dw, C, H * W, num_groups,
                             HAS_COND=cond is not None, SILU=silu, ACC=_acc(x), BLOCK=_block(H * W))
    # Fixed-order sums over the batch: deterministic weight and bias gradients.
    return (dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype),
            None if dcond is None else dcond.to(cond.dtype))
