"""Triton flash attention (non-causal) for the U-Net's attention block (math:
``vdm_fast.reference.attention``; the block's GroupNorm and projections are in
``vdm_fast.ops.attention``).

q, k, v, o: ``[BH, N, d]`` contiguous (BH = batch x heads, N = H*W tokens, d = head dim).
Forward: a program per (query block, BH) streams key/value blocks with an online softmax (in
base 2: the scale folded with log2(e), ``exp2``) and saves the natural log-sum-exp ``[BH, N]``;
the ``N x N`` matrix never exists. Backward recomputes the probabilities from the log-sum-exp:
one kernel per key block accumulates dK and dV over all query blocks, its products transposed
(keys as their rows) so that each has ``M = BLOCK_N >= 64``, as Hopper's ``wgmma`` needs and
Triton's fused-attention tutorial does (at head dim 256 in two launches, dK's and dV's: both
accumulators with K and V do not fit in the registers); another per query block accumulates dQ
over all key blocks. Every gradient is written by exactly one program (deterministic, no
atomics).

Launch: a 1-d grid, token blocks fastest (programs of one head run together and share its K and
V in L2), so no grid axis meets CUDA's 65535 cap on axes 1 and 2; the ``bh`` row base is int64
(``BH * N * d`` may pass 2^31 elements), offsets inside one head int32; every launch runs in
``_device.guard`` (the tensors' device current). Tile shapes per dtype and head dim:
``kernels/attention_tiles.py``.

Precision: the matrix products take their operands in the inputs' dtype (bf16/fp16 on the
tensor cores; probabilities and score gradients are cast to it, as flash attention does) and
accumulate in float32; softmax statistics are float32. float32 inputs multiply in TF32 where
torch allows it for float32 matmuls (``torch.backends.cuda.matmul.fp32_precision == "tf32"``,
``allow_tf32``, ``set_float32_matmul_precision("high")``), else in full float32
(``input_precision="ieee"``, torch's default).
"""

import os

import torch
import triton
import triton.language as tl

from vdm_fast.kernels import _device
from vdm_fast.kernels import attention_tiles as tiles_table


@triton.jit
def _program(N, BLOCK: tl.constexpr):
    """This program's token block and (batch x head) index: a 1-d grid, token blocks fastest."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _head_base(bh, N, d):
    """Element offset of head ``bh``'s ``[N, d]`` matrix, in int64."""
    return bh.to(tl.int64) * N * d


@triton.jit
def _tile_offsets(start, N, d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[start, start + BLOCK)`` of an ``[N, d]`` matrix: offsets, 2-d mask, rows, row mask."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    return rows[:, None] * d + cols[None, :], row_mask[:, None] & (cols < d)[None, :], rows, row_mask


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` in ``b``'s dtype (``a`` rounded to it), accumulated in float32. ``UPCAST``: the
    same rounded operands multiplied in float32, for Triton's CPU interpreter, whose products of
    bfloat16 tiles are wrong."""
    a = a.to(b.dtype)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, d, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    m_blk, bh = _program(N, BLOCK_M)
    base = _head_base(bh, N, d)
    q_offs, q_mask, offs_m, mask_m = _tile_offsets(m_blk * BLOCK_M, N, d, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + base + q_offs, mask=q_mask, other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e): the softmax in base 2
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        kv_offs, kv_mask, offs_n, mask_n = _tile_offsets(n0, N, d, BLOCK_N, BLOCK_D)
        k = tl.load(k_ptr + base + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + kv_offs, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, PRECISION, UPCAST)
        m_i = m_new
    tl.store(o_ptr + base + q_offs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln(2): back to the natural log-sum-exp
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, N, d, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr):
    """dV = P^T dO and dK = scale dS^T Q for ``BLOCK_N`` keys over all query blocks, every
    product with the keys as its rows: ``P^T = exp2(K Q^T scale log2e - lse log2e)``,
    ``dS^T = P^T * (V dO^T - delta)``. ``WANT_DK``/``WANT_DV``: which of the two this launch
    writes (both, or one each in two launches where both accumulators would not fit in
    registers: ``Tiles.split_dkdv``)."""
    n_blk, bh = _program(N, BLOCK_N)
    base = _head_base(bh, N, d)
    kv_offs, kv_mask, offs_n, mask_n = _tile_offsets(n_blk * BLOCK_N, N, d, BLOCK_N, BLOCK_D)
    k = tl.load(k_ptr + base + kv_offs, mask=kv_mask, other=0.0)
    if WANT_DK:
        v = tl.load(v_ptr + base + kv_offs, mask=kv_mask, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    row_base = bh.to(tl.int64) * N
    for m0 in range(0, N, BLOCK_M):
        q_offs, q_mask, offs_m, mask_m = _tile_offsets(m0, N, d, BLOCK_M, BLOCK_D)
        q = tl.load(q_ptr + base + q_offs, mask=q_mask, other=0.0)
        do = tl.load(do_ptr + base + q_offs, mask=q_mask, other=0.0)
        lse2 = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        p_t = tl.exp2(_dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale - lse2[None, :])
        p_t = tl.where(mask_m[None, :], p_t, 0.0)
        if WANT_DV:
            dv += _dot(p_t, do, PRECISION, UPCAST)
        if WANT_DK:
            delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
            ds_t = p_t * (_dot(v, tl.trans(do), PRECISION, UPCAST) - delta[None, :])
            dk += _dot(ds_t, q, PRECISION, UPCAST)
    if WANT_DK:
        tl.store(dk_ptr + base + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    if WANT_DV:
        tl.store(dv_ptr + base + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, N, d, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """dQ = scale dS K for ``BLOCK_M`` queries over all key blocks."""
    m_blk, bh = _program(N, BLOCK_M)
    base = _head_base(bh, N, d)
    q_offs, q_mask, offs_m, mask_m = _tile_offsets(m_blk * BLOCK_M, N, d, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + base + q_offs, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + base + q_offs, mask=q_mask, other=0.0)
    row_base = bh.to(tl.int64) * N
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        kv_offs, kv_mask, offs_n, mask_n = _tile_offsets(n0, N, d, BLOCK_N, BLOCK_D)
        k = tl.load(k_ptr + base + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + kv_offs, mask=kv_mask, other=0.0)
        p = tl.exp2(_dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale - lse2[:, None])
        # Keys past N: their zero rows make the scores 0, whose exp2 may overflow; zero them.
        p = tl.where(mask_n[None, :], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])
        dq += _dot(ds, k, PRECISION, UPCAST)
    tl.store(dq_ptr + base + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# The interpreter runs only where no GPU is (the tests): see _dot.
UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


def _options(q, d: int, variant=None, tf32=None):
    """``(tiles, constexprs)``: the tile set (``variant``: a name in ``attention_tiles.VARIANTS``,
    a ``Tiles``, or None for the default) and the constexprs the three kernels share."""
    if isinstance(variant, tiles_table.Tiles):
        kind = tiles_table.kind(q.dtype, tf32)
    else:
        kind, variant = tiles_table.choose(q.dtype, d, variant, tf32)
    return variant, dict(BLOCK_D=tiles_table.block_d(d), PRECISION="tf32" if kind == "tf32" else "ieee",
                         UPCAST=UPCAST)


def _launch_options(block_m, block_n, num_warps, num_stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def flash_attention_forward(q, k, v, scale, variant=None, tf32=None):
    """``(o, lse)`` for ``[BH, N, d]`` contiguous q, k, v. ``variant``: a tile set's name in
    ``attention_tiles.VARIANTS`` or a ``Tiles`` (default: ``DEFAULT``'s); ``tf32``: float32
    products in TF32 (default: torch's float32 matmul setting)."""
    BH, N, d = q.shape
    tiles, consts = _options(q, d, variant, tf32)
    o = torch.empty_like(q)
    lse = torch.empty((BH, N), device=q.device, dtype=torch.float32)
    block_m = tiles.fwd[0]
    with _device.guard(q):
        _attn_fwd[(triton.cdiv(N, block_m) * BH,)](q, k, v, o, lse, N, d, scale, **consts,
                                                   **_launch_options(*tiles.fwd))
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, scale, variant=None, tf32=None):
    """``(dq, dk, dv)``."""
    BH, N, d = q.shape
    tiles, consts = _options(q, d, variant, tf32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with _device.guard(q):
        delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O): [BH, N]
        grid = (triton.cdiv(N, tiles.dkdv[1]) * BH,)
        for want_dk, want_dv in ((True, False), (False, True)) if tiles.split_dkdv else ((True, True),):
            _attn_bwd_dkdv[grid](q, k, v, do, lse, delta, dk, dv, N, d, scale, **consts, WANT_DK=want_dk,
                                 WANT_DV=want_dv, **_launch_options(*tiles.dkdv))
        _attn_bwd_dq[(triton.cdiv(N, tiles.dq[0]) * BH,)](q, k, v, do, lse, delta, dq, N, d, scale, **consts,
                                                          **_launch_options(*tiles.dq))
    return dq, dk, dv
