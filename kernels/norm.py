"""Triton kernels of GroupNorm (+ swish, + the ResNet block's per-channel conditioning add)
(math: ``vdm_fast.reference.norm.group_norm_silu``).

Layout: NCHW or channels_last (NHWC, the trainer's default), read in place; ``y``, ``dy`` and
``dx`` share ``x``'s layout, a constexpr of the kernels (``CHANNELS_LAST``), so that the
contiguous axis of a tile (pixels in NCHW, channels in channels_last) is known when it compiles
and its loads and stores are vectors. The channels per group (``CPG``) are a constexpr too: a
group's channels then start at a known multiple of ``CPG`` and, where the channel tile covers
them exactly, need no mask, so a channels_last tile row is one ``CPG``-element vector. One
program per (example, group), groups fastest over a 1-d grid (no grid axis meets CUDA's 65535
cap), walks the group's ``CPG`` channels x ``H*W`` pixels in 2-d tiles; the example's base
offset is int64 (``B*C*H*W`` may pass 2^31 elements), offsets inside one example int32:

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

from vdm_fast.kernels import _device

TILE = 2048  # elements per tile: channels-in-group x pixels


@triton.jit
def _program(G):
    """``(group, example)`` of this program (groups fastest); the example in int64."""
    pid = tl.program_id(0)
    return pid % G, (pid // G).to(tl.int64)


@triton.jit
def _channels(g, c0, CPG: tl.constexpr, BLOCK_C: tl.constexpr):
    """Group ``g``'s channel indices from its ``c0``-th, ``[BLOCK_C]``, and which exist (all of
    them where the tiles cover the group exactly: no mask, so the loads stay vectors)."""
    cc = c0 + tl.arange(0, BLOCK_C)
    if CPG % BLOCK_C == 0:
        mask = tl.full((BLOCK_C,), 1, tl.int1)
    else:
        mask = cc < CPG
    return g * CPG + cc, mask


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
def _offsets(b, c, p, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a ``[channels, pixels]`` tile of example ``b`` (int64 ``b``: the base
    is 64-bit, the offsets inside the example 32-bit)."""
    if CHANNELS_LAST:
        return b * HW * C + (p[None, :] * C + c[:, None])
    return b * C * HW + (c[:, None] * HW + p[None, :])


@triton.jit
def _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, HW, HAS_COND: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                ACC: tl.constexpr):
    v = tl.load(x_ptr + _offsets(b, c, p, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
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
def _gn_fwd(x_ptr, w_ptr, b_ptr, cond_ptr, y_ptr, mean_ptr, rstd_ptr, C, HW, G, eps, CPG: tl.constexpr,
            CHANNELS_LAST: tl.constexpr, HAS_COND: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    g, b = _program(G)
    lane_mean = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    lane_m2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    lane_n = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for c0 in range(0, CPG, BLOCK_C):
        c, c_mask = _channels(g, c0, CPG, BLOCK_C)
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, HW, HAS_COND, CHANNELS_LAST, ACC)
            lane_n += mask.to(ACC)
            delta = v - lane_mean
            lane_mean += tl.where(mask, delta / tl.maximum(lane_n, 1.0), 0.0)
            lane_m2 += tl.where(mask, delta * (v - lane_mean), 0.0)
    row_mean, row_m2, row_n = tl.reduce((lane_mean, lane_m2, lane_n), 1, _welford_merge)
    mean, m2, n = tl.reduce((row_mean, row_m2, row_n), 0, _welford_merge)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    tl.store(mean_ptr + b * G + g, mean)
    tl.store(rstd_ptr + b * G + g, rstd)
    for c0 in range(0, CPG, BLOCK_C):
        c, c_mask = _channels(g, c0, CPG, BLOCK_C)
        wc, bc = _affine(w_ptr, b_ptr, c, c_mask, ACC)
        scale = wc * rstd
        shift = bc - mean * scale
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, HW, HAS_COND, CHANNELS_LAST, ACC)
            out = v * scale + shift
            if SILU:
                out = out * tl.sigmoid(out)
            tl.store(y_ptr + _offsets(b, c, p, C, HW, CHANNELS_LAST), out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, p, mask, C, HW, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
              ACC: tl.constexpr):
    """The normalised value and the gradient reaching the affine output (before swish), zero
    outside the tile's mask."""
    xhat = (v - mean) * rstd
    dy = tl.load(dy_ptr + _offsets(b, c, p, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
    if SILU:
        pre = xhat * wc + bc
        s = tl.sigmoid(pre)
        dy = dy * s * (1.0 + pre * (1.0 - s))
    return tl.where(mask, xhat, 0.0), tl.where(mask, dy, 0.0)


@triton.jit
def _gn_bwd(dy_ptr, x_ptr, w_ptr, b_ptr, cond_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, dcond_ptr,
            C, HW, G, CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_COND: tl.constexpr, SILU: tl.constexpr,
            ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    g, b = _program(G)
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)
    sum_dxhat = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    sum_dxhat_xhat = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for c0 in range(0, CPG, BLOCK_C):
        c, c_mask = _channels(g, c0, CPG, BLOCK_C)
        wc, bc = _affine(w_ptr, b_ptr, c, c_mask, ACC)
        dw = tl.zeros((BLOCK_C,), dtype=ACC)
        dbias = tl.zeros((BLOCK_C,), dtype=ACC)
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, HW, HAS_COND, CHANNELS_LAST, ACC)
            xhat, dpre = _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, p, mask, C, HW, SILU, CHANNELS_LAST, ACC)
            dw += tl.sum(dpre * xhat, axis=1)
            dbias += tl.sum(dpre, axis=1)
            sum_dxhat += dpre * wc
            sum_dxhat_xhat += dpre * wc * xhat
        tl.store(dw_ptr + b * C + c, dw, mask=c_mask)
        tl.store(db_ptr + b * C + c, dbias, mask=c_mask)
    n = CPG * HW
    m1 = tl.sum(tl.sum(sum_dxhat, axis=1), axis=0) / n
    m2 = tl.sum(tl.sum(sum_dxhat_xhat, axis=1), axis=0) / n
    for c0 in range(0, CPG, BLOCK_C):
        c, c_mask = _channels(g, c0, CPG, BLOCK_C)
        wc, bc = _affine(w_ptr, b_ptr, c, c_mask, ACC)
        dsum = tl.zeros((BLOCK_C,), dtype=ACC)
        for p0 in range(0, HW, BLOCK_P):
            p, mask = _pixels(p0, HW, c_mask, BLOCK_P)
            v = _load_input(x_ptr, cond_ptr, b, c, p, c_mask, mask, C, HW, HAS_COND, CHANNELS_LAST, ACC)
            xhat, dpre = _grad_pre(dy_ptr, v, mean, rstd, wc, bc, b, c, p, mask, C, HW, SILU, CHANNELS_LAST, ACC)
            dx = tl.where(mask, rstd * (dpre * wc - m1 - xhat * m2), 0.0)
            tl.store(dx_ptr + _offsets(b, c, p, C, HW, CHANNELS_LAST), dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dsum += tl.sum(dx, axis=1)
        if HAS_COND:
            tl.store(dcond_ptr + b * C + c, dsum, mask=c_mask)


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _launch_config(x, num_groups):
    """Grid, the layout and channel constexprs, and the tile shape."""
    B, C, H, W = x.shape
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        raise ValueError("x must be a dense NCHW or channels_last tensor")
    cpg = C // num_groups
    block_c = min(triton.next_power_of_2(cpg), 64)
    block_p = max(1, min(triton.next_power_of_2(H * W), TILE // block_c))
    # Groups vary fastest across programs: neighbouring programs then read neighbouring channels
    # of the same pixels, which in channels_last share cache lines. A warp per 256 tile elements
    # (Triton's layer-norm rule): with 4, ptxas spills the backward's tile sums (compile_triton.py).
    meta = {"CPG": cpg, "CHANNELS_LAST": channels_last, "BLOCK_C": block_c, "BLOCK_P": block_p,
            "num_warps": min(max(block_c * block_p // 256, 1), 8)}
    return (num_groups * B,), meta


def group_norm_silu_forward(x, weight, bias, cond, num_groups, eps, silu):
    """``(y, mean, rstd)``; ``x`` NCHW or channels_last, ``y`` in ``x``'s layout; ``cond``
    ``[B, C]`` contiguous or None."""
    B, C, H, W = x.shape
    grid, meta = _launch_config(x, num_groups)
    y = torch.empty_like(x)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.empty((B, num_groups), device=x.device, dtype=stats_dtype)
    rstd = torch.empty_like(mean)
    with _device.guard(x):
        _gn_fwd[grid](x, weight, bias, cond if cond is not None else x, y, mean, rstd, C, H * W, num_groups, eps,
                      HAS_COND=cond is not None, SILU=silu, ACC=_acc(x), **meta)
    return y, mean, rstd


def group_norm_silu_backward(dy, x, weight, bias, cond, mean, rstd, num_groups, silu):
    """``(dx, dweight, dbias, dcond)``; ``dy`` and ``dx`` in ``x``'s layout; ``dcond`` is None
    without conditioning."""
    B, C, H, W = x.shape
    grid, meta = _launch_config(x, num_groups)
    if not dy.is_contiguous(memory_format=torch.channels_last if meta["CHANNELS_LAST"] else torch.contiguous_format):
        raise ValueError("dy must have x's layout")
    dx = torch.empty_like(x)
    dw = torch.empty((B, C), device=x.device, dtype=mean.dtype)
    db = torch.empty_like(dw)
    dcond = torch.empty_like(dw) if cond is not None else None
    with _device.guard(x):
        _gn_bwd[grid](dy, x, weight, bias, cond if cond is not None else x, mean, rstd, dx, dw, db,
                      dcond if dcond is not None else dw, C, H * W, num_groups,
                      HAS_COND=cond is not None, SILU=silu, ACC=_acc(x), **meta)
        # Fixed-order sums over the batch: deterministic weight and bias gradients.
        return (dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype),
                None if dcond is None else dcond.to(cond.dtype))
