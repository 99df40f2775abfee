"""Triton flash attention (non-causal) for the U-Net's attention block (math:
``vdm_fast.reference.attention``; the block's GroupNorm and projections are in
``vdm_fast.ops.attention``).

q, k, v, o: ``[BH, N, d]`` contiguous (BH = batch x heads, N = H*W tokens, d = head dim).
Forward: a program per (query block, BH) streams key/value blocks with an online softmax and
saves the log-sum-exp ``[BH, N]``; the ``N x N`` matrix never exists. Backward recomputes the
probabilities from the log-sum-exp: one kernel per key block accumulates dK and dV over all
query blocks, another per query block accumulates dQ over all key blocks; every gradient is
written by exactly one program (deterministic, no atomics).

Precision: the matrix products take their operands in the inputs' dtype (bf16/fp16 on the
tensor cores; probabilities and score gradients are cast to it, as flash attention does) and
accumulate in float32; softmax statistics are float32. float32 inputs multiply in full float32
(``input_precision="ieee"``), not TF32, matching torch's default for float32 matmuls.
"""

import os

import torch
import triton
import triton.language as tl

BLOCK_M = 32
BLOCK_N = 32


@triton.jit
def _load_rows(ptr, base, offs_rows, mask_rows, offs_d, mask_d, d):
    """A ``[rows, BLOCK_D]`` tile of a ``[N, d]`` matrix, zero outside, in its dtype."""
    mask = mask_rows[:, None] & mask_d[None, :]
    return tl.load(ptr + base + offs_rows[:, None] * d + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _rows(start, N, BLOCK: tl.constexpr):
    """Token indices ``[start, start + BLOCK)`` and which of them exist."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _load_kv(k_ptr, v_ptr, base, offs_n, mask_n, offs_d, mask_d, d):
    return (_load_rows(k_ptr, base, offs_n, mask_n, offs_d, mask_d, d),
            _load_rows(v_ptr, base, offs_n, mask_n, offs_d, mask_d, d))


@triton.jit
def _load_query_grads(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, N, offs_m, mask_m, offs_d, mask_d, d):
    """A query block's q and dO tiles with its saved log-sum-exp and rowsum(dO * O)."""
    q = _load_rows(q_ptr, base, offs_m, mask_m, offs_d, mask_d, d)
    do = _load_rows(do_ptr, base, offs_m, mask_m, offs_d, mask_d, d)
    lse = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
    return q, do, lse, delta


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """``a @ b`` in ``b``'s dtype (``a`` rounded to it), accumulated in float32. ``UPCAST``: the
    same rounded operands multiplied in float32, for Triton's CPU interpreter, whose products of
    bfloat16 tiles are wrong."""
    a = a.to(b.dtype)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _store_rows(ptr, value, base, offs_rows, mask_rows, offs_d, mask_d, d):
    mask = mask_rows[:, None] & mask_d[None, :]
    tl.store(ptr + base + offs_rows[:, None] * d + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, mask_m, mask_n, scale, UPCAST: tl.constexpr):
    """The backward's shared step: probabilities recomputed from the log-sum-exp, and the
    gradient of the (scaled) scores, ``P * (dO V^T - rowsum(dO * O)) * scale``."""
    p = tl.exp(_mm(q, tl.trans(k), UPCAST) * scale - lse[:, None])
    p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
    ds = p * (_mm(do, tl.trans(v), UPCAST) - delta[:, None]) * scale
    return p, ds


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, d, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    m_blk, bh = tl.program_id(0), tl.program_id(1)
    base = bh * N * d
    offs_m, mask_m = _rows(m_blk * BLOCK_M, N, BLOCK_M)
    offs_d, mask_d = _rows(0, d, BLOCK_D)
    q = _load_rows(q_ptr, base, offs_m, mask_m, offs_d, mask_d, d)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n = _rows(n0, N, BLOCK_N)
        k, v = _load_kv(k_ptr, v_ptr, base, offs_n, mask_n, offs_d, mask_d, d)
        s = _mm(q, tl.trans(k), UPCAST) * scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        correction = tl.exp(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + _mm(p, v, UPCAST)
        m_i = m_new
    _store_rows(o_ptr, acc / l_i[:, None], base, offs_m, mask_m, offs_d, mask_d, d)
    tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, N, d, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    n_blk, bh = tl.program_id(0), tl.program_id(1)
    base = bh * N * d
    offs_n, mask_n = _rows(n_blk * BLOCK_N, N, BLOCK_N)
    offs_d, mask_d = _rows(0, d, BLOCK_D)
    k, v = _load_kv(k_ptr, v_ptr, base, offs_n, mask_n, offs_d, mask_d, d)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m, mask_m = _rows(m0, N, BLOCK_M)
        q, do, lse, delta = _load_query_grads(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, N, offs_m, mask_m,
                                              offs_d, mask_d, d)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, mask_m, mask_n, scale, UPCAST)
        dv += _mm(tl.trans(p), do, UPCAST)
        dk += _mm(tl.trans(ds), q, UPCAST)
    _store_rows(dk_ptr, dk, base, offs_n, mask_n, offs_d, mask_d, d)
    _store_rows(dv_ptr, dv, base, offs_n, mask_n, offs_d, mask_d, d)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, N, d, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    m_blk, bh = tl.program_id(0), tl.program_id(1)
    base = bh * N * d
    offs_m, mask_m = _rows(m_blk * BLOCK_M, N, BLOCK_M)
    offs_d, mask_d = _rows(0, d, BLOCK_D)
    q, do, lse, delta = _load_query_grads(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, N, offs_m, mask_m,
                                          offs_d, mask_d, d)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n = _rows(n0, N, BLOCK_N)
        k, v = _load_kv(k_ptr, v_ptr, base, offs_n, mask_n, offs_d, mask_d, d)
        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, mask_m, mask_n, scale, UPCAST)
        dq += _mm(ds, k, UPCAST)
    _store_rows(dq_ptr, dq, base, offs_m, mask_m, offs_d, mask_d, d)


# The interpreter runs only where no GPU is (the tests): see _mm.
UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


def _meta(q, d: int) -> dict:
    """Block shapes and launch options. The options come from ptxas's register and shared-memory
    report for sm_90 and sm_80 (tests/compile_triton.py), not from timings. bf16/fp16 from
    head_dim 128 and float32 always (its full-precision products run on the FMA units, in
    registers) take 8 warps; with 4, the backward spilled up to 41 KB a thread. float32
    pipelines 1 stage (2 at head_dim 256, the fewest spills): its default 3 stages of 256-wide
    tiles need 196 KiB of shared memory, more than an A100's 163."""
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d, UPCAST=UPCAST, num_warps=4)
    if q.dtype == torch.float32:
        meta.update(num_warps=8, num_stages=2 if block_d >= 256 else 1)
    elif block_d >= 128:
        meta["num_warps"] = 8
    return meta


def flash_attention_forward(q, k, v, scale):
    """``(o, lse)`` for ``[BH, N, d]`` contiguous q, k, v."""
    BH, N, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((BH, N), device=q.device, dtype=torch.float32)
    _attn_fwd[(triton.cdiv(N, BLOCK_M), BH)](q, k, v, o, lse, N, d, scale, **_meta(q, d))
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, scale):
    """``(dq, dk, dv)``."""
    BH, N, d = q.shape
    delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O): [BH, N]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _meta(q, d)
    _attn_bwd_dkdv[(triton.cdiv(N, BLOCK_N), BH)](q, k, v, do, lse, delta, dk, dv, N, d, scale, **meta)
    _attn_bwd_dq[(triton.cdiv(N, BLOCK_M), BH)](q, k, v, do, lse, delta, dq, N, d, scale, **meta)
    return dq, dk, dv
