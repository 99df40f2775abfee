"""Triton kernels of GroupNorm (+ swish, + the ResNet block's per-channel conditioning add)
(math: ``vdm_fast.reference.norm.group_norm_silu``).

Layout: NCHW or channels_last (NHWC), read in place through the strides of (example, channel,
pixel); ``y``, ``dy`` and ``dx`` share ``x``'s layout. One program per (example, group) walks the
group's ``C/G`` channels x ``H*W`` pixels in 2-d tiles (groups vary fastest over the grid):

- forward: pass 1 accumulates the mean and variance with Welford's update per tile lane and
  Chan's merge across lanes (float32, float64 for float64 input; stable for activations whose
  mean is large next to their spread, where sum and sum of squares cancel); pass 2 normalises,
  scales, shifts, applies swish and stores. ``mean`` and ``rstd`` (``[B, G]``) are saved.
- backward: pass 1 recomputes the normalised values and sums, per channel, the two terms of
  the weight and bias gradients (written as ``[B, C]`` partials and summed over the batch
  afterwards: deterministic, no atomics) and, per group, the two means of the input gradient;
  pass 2 writes the input gradient (and, with conditioning, its per-channel sums).
"""

import torch
import triton
import triton.language as tl

TILE = 2048  # elements per tile: channels-in-group x pixels


@triton.jit
def _channels(g, c0, C, G, BLOCK_C: tl.constexpr):
    """Group ``g``'s channel indices from its ``c0``-th, ``[BLOCK_C]``, and which exist."""
    cc = c0 + tl.arange(0, BLOCK_C)
    return g * (C // G) + cc, cc < C // G


@triton.jit
def _pixels(p0, HW, c_mask, BLOCK_P: tl.constexpr):
    """Pixel indices ``[BLOCK_P]`` from ``p0`` and the tile's 2-d mask with the channel mask."""
    p = p0 + tl.arange(0, BLOCK_P)
    return p, c_mask[:, None] & (p < HW)[None, :]


@triton.jit
def _affine(w_ptr, b_ptr, c, c_mask, ACC: tl.constexpr):
    """The channels' weight and bias as ``[BLOCK_C, 1]`` columns."""
    return (tl.load(w_ptr + c, mask=c_mask, other=0.0).to(ACC)[:, None],
            tl.load(b_ptr + c, mask=c_mask, other=0.0).to(ACC)[:, None])


@triton.jit
def _offsets(b, c, p, s_b, s_c, s_p):
    return b * s_b + c[:, None] * s_c + p[None, :] * s_p


@triton.jit
def _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, s_b, s_c, s_p, HAS_COND: tl.constexpr,
                ACC: tl.constexpr):
    v = tl.load(x_ptr + _offsets(b, c, p, s_b, s_c, s_p), mask=mask, other=0.0).to(ACC)
    if HAS_COND:
        v += tl.load(cond_ptr + b * C + c, mask=c_mask, other=0.0).to(ACC)[:, None]
    return v


@triton.jit
def _welford_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, sum of squared deviations, count) summaries."""
    n = n_a + n_b
    frac_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * frac_b, m2_a + m2_b + delta * delta * n_a * frac_b, n


@triton.jit
def _gn_fwd(x_ptr, w_ptr, b_ptr, cond_ptr, y_ptr, mean_ptr, rstd_ptr, C, HW, G, s_b, s_c, s_p, eps,
            HAS_COND: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_P: tl.constexpr):
    g, b = tl.program_id(0), tl.program_id(1)
    cpg = C // G
    lane_mean = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    lane_m2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    lane_n = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for c0 in range(0, cpg, BLOCK_C):
        c, c_mask = _channels(g, c0, C, G, BLOCK_C)
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, s_b, s_c, s_p, HAS_COND, ACC)
            lane_n += mask.to(ACC)
            delta = v - lane_mean
            lane_mean += tl.where(mask, delta / tl.maximum(lane_n, 1.0), 0.0)
            lane_m2 += tl.where(mask, delta * (v - lane_mean), 0.0)
    row_mean, row_m2, row_n = tl.reduce((lane_mean, lane_m2, lane_n), 1, _welford_merge)
    mean, m2, n = tl.reduce((row_mean, row_m2, row_n), 0, _welford_merge)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    tl.store(mean_ptr + b * G + g, mean)
    tl.store(rstd_ptr + b * G + g, rstd)
    for c0 in range(0, cpg, BLOCK_C):
        c, c_mask = _channels(g, c0, C, G, BLOCK_C)
        wc, bc = _affine(w_ptr, b_ptr, c, c_mask, ACC)
        scale = wc * rstd
        shift = bc - mean * scale
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, s_b, s_c, s_p, HAS_COND, ACC)
            out = v * scale + shift
            if SILU:
                out = out * tl.sigmoid(out)
            tl.store(y_ptr + _offsets(b, c, p, s_b, s_c, s_p), out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, p, mask, s_b, s_c, s_p, SILU: tl.constexpr,
              ACC: tl.constexpr):
    """The normalised value and the gradient reaching the affine output (before swish), zero
    outside the tile's mask."""
    xhat = (v - mean) * rstd
    dy = tl.load(dy_ptr + _offsets(b, c, p, s_b, s_c, s_p), mask=mask, other=0.0).to(ACC)
    if SILU:
        pre = xhat * wc + bc
        s = tl.sigmoid(pre)
        dy = dy * s * (1.0 + pre * (1.0 - s))
    return tl.where(mask, xhat, 0.0), tl.where(mask, dy, 0.0)


@triton.jit
def _gn_bwd(dy_ptr, x_ptr, w_ptr, b_ptr, cond_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, dcond_ptr,
            C, HW, G, s_b, s_c, s_p, HAS_COND: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    g, b = tl.program_id(0), tl.program_id(1)
    cpg = C // G
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)
    sum_dxhat = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    sum_dxhat_xhat = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for c0 in range(0, cpg, BLOCK_C):
        c, c_mask = _channels(g, c0, C, G, BLOCK_C)
        wc, bc = _affine(w_ptr, b_ptr, c, c_mask, ACC)
        dw = tl.zeros((BLOCK_C,), dtype=ACC)
        dbias = tl.zeros((BLOCK_C,), dtype=ACC)
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, s_b, s_c, s_p, HAS_COND, ACC)
            xhat, dpre = _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, p, mask, s_b, s_c, s_p, SILU, ACC)
            dw += tl.sum(dpre * xhat, axis=1)
            dbias += tl.sum(dpre, axis=1)
            sum_dxhat += dpre * wc
            sum_dxhat_xhat += dpre * wc * xhat
        tl.store(dw_ptr + b * C + c, dw, mask=c_mask)
        tl.store(db_ptr + b * C + c, dbias, mask=c_mask)
    n = cpg * HW
    m1 = tl.sum(tl.sum(sum_dxhat, axis=1), axis=0) / n
    m2 = tl.sum(tl.sum(sum_dxhat_xhat, axis=1), axis=0) / n
    for c0 in range(0, cpg, BLOCK_C):
        c, c_mask = _channels(g, c0, C, G, BLOCK_C)
        wc, bc = _affine(w_ptr, b_ptr, c, c_mask, ACC)
        dsum = tl.zeros((BLOCK_C,), dtype=ACC)
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, s_b, s_c, s_p, HAS_COND, ACC)
            xhat, dpre = _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, p, mask, s_b, s_c, s_p, SILU, ACC)
            dx = tl.where(mask, rstd * (dpre * wc - m1 - xhat * m2), 0.0)
            tl.store(dx_ptr + _offsets(b, c, p, s_b, s_c, s_p), dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dsum += tl.sum(dx, axis=1)
        if HAS_COND:
            tl.store(dcond_ptr + b * C + c, dsum, mask=c_mask)


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _launch_config(x, num_groups):
    """Grid, the (example, channel, pixel) strides of ``x`` (NCHW or channels_last, dense) and
    the tile shape."""
    B, C, H, W = x.shape
    if x.is_contiguous():
        strides = (C * H * W, H * W, 1)
    elif x.is_contiguous(memory_format=torch.channels_last):
        strides = (H * W * C, 1, C)
    else:
        raise ValueError("x must be a dense NCHW or channels_last tensor")
    block_c = min(triton.next_power_of_2(C // num_groups), 64)
    block_p = max(1, min(triton.next_power_of_2(H * W), TILE // block_c))
    # Groups vary fastest across programs: neighbouring programs then read neighbouring channels
    # of the same pixels, which in channels_last share cache lines. A warp per 256 tile elements
    # (Triton's layer-norm rule): with 4, ptxas spills the backward's tile sums (compile_triton.py).
    meta = {"BLOCK_C": block_c, "BLOCK_P": block_p, "num_warps": min(max(block_c * block_p // 256, 1), 8)}
    return (num_groups, B), strides, meta


def group_norm_silu_forward(x, weight, bias, cond, num_groups, eps, silu):
    """``(y, mean, rstd)``; ``x`` NCHW or channels_last, ``y`` in ``x``'s layout; ``cond``
    ``[B, C]`` contiguous or None."""
    B, C, H, W = x.shape
    grid, strides, blocks = _launch_config(x, num_groups)
    y = torch.empty_like(x)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.empty((B, num_groups), device=x.device, dtype=stats_dtype)
    rstd = torch.empty_like(mean)
    _gn_fwd[grid](x, weight, bias, cond if cond is not None else x, y, mean, rstd, C, H * W, num_groups,
                  *strides, eps, HAS_COND=cond is not None, SILU=silu, ACC=_acc(x), **blocks)
    return y, mean, rstd


def group_norm_silu_backward(dy, x, weight, bias, cond, mean, rstd, num_groups, silu):
    """``(dx, dweight, dbias, dcond)``; ``dy`` and ``dx`` in ``x``'s layout; ``dcond`` is None
    without conditioning."""
    B, C, H, W = x.shape
    grid, strides, blocks = _launch_config(x, num_groups)
    if not dy.is_contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last):
        raise ValueError("dy must have x's layout")
    dx = torch.empty_like(x)
    dw = torch.empty((B, C), device=x.device, dtype=mean.dtype)
    db = torch.empty_like(dw)
    dcond = torch.empty_like(dw) if cond is not None else None
    _gn_bwd[grid](dy, x, weight, bias, cond if cond is not None else x, mean, rstd, dx, dw, db,
                  dcond if dcond is not None else dw, C, H * W, num_groups, *strides,
                  HAS_COND=cond is not None, SILU=silu, ACC=_acc(x), **blocks)
    # Fixed-order sums over the batch: deterministic weight and bias gradients.
    return (dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype),
            None if dcond is None else dcond.to(cond.dtype))
