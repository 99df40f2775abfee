"""Triton kernels of the fused monotone noise schedule (math and gradient formulas in
``csrc/schedule.h``; reference: ``vdm_fast.reference.schedule.nnet``).

Forward: a program per ``BLOCK_B`` examples, looping over the hidden units in tiles.
Backward, two launches: a program per (``BLOCK_N`` units, a run of ``BLOCK_B``-example tiles)
writes its partial parameter gradients (summed over its examples) and its partial sums over
units (for d/dt); a second kernel sums those partials in a fixed order and applies the per-unit
factors, so results are deterministic and no torch op runs between or after (at B=128 each
would cost more launch time than the kernels).
"""

import torch
import triton
import triton.language as tl

from vdm_fast.kernels import _device

BLOCK_B = 32
BLOCK_N = 128
BLOCK_SUM = 1024
# The backward's example programs: at most this many, each looping over several tiles at large B,
# so the finishing sums stay short loops.
MAX_EXAMPLE_PROGRAMS = 128


@triton.jit
def _tile(t_ptr, w2_ptr, b2_ptr, w3_ptr, B, n, offs_i, offs_j):
    """Per tile: t, u = 2t - 1, |w2|, |w3| and h = sigmoid(|w2| u + b2), masked."""
    mi, mj = offs_i < B, offs_j < n
    t = tl.load(t_ptr + offs_i, mask=mi, other=0.0)
    a2 = tl.abs(tl.load(w2_ptr + offs_j, mask=mj, other=0.0))
    a3 = tl.abs(tl.load(w3_ptr + offs_j, mask=mj, other=0.0))  # 0 outside: masked units add 0
    b2 = tl.load(b2_ptr + offs_j, mask=mj, other=0.0)
    u = 2.0 * t - 1.0
    h = tl.sigmoid(a2[None, :] * u[:, None] + b2[None, :])
    return t, u, a2, a3, h


@triton.jit
def _nnet_fwd(t_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, gamma_ptr, dgamma_ptr, B, n,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_i = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    acc_g = tl.zeros((BLOCK_B,), dtype=tl.float32).to(t_ptr.dtype.element_ty)
    acc_d = tl.zeros_like(acc_g)
    for j0 in range(0, n, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        t, u, a2, a3, h = _tile(t_ptr, w2_ptr, b2_ptr, w3_ptr, B, n, offs_i, offs_j)
        acc_g += tl.sum(a3[None, :] * (2.0 * h - 1.0), axis=1)
        acc_d += tl.sum((a3 * a2)[None, :] * h * (1.0 - h), axis=1)
    a1 = tl.abs(tl.load(w1_ptr))
    mask = offs_i < B
    t = tl.load(t_ptr + offs_i, mask=mask, other=0.0)
    tl.store(gamma_ptr + offs_i, tl.load(b1_ptr) + a1 * t + acc_g / n, mask=mask)
    tl.store(dgamma_ptr + offs_i, a1 + 4.0 * acc_d / n, mask=mask)


@triton.jit
def _nnet_bwd(t_ptr, w2_ptr, b2_ptr, w3_ptr, gg_ptr, gd_ptr, acc_ptr, part_ptr, B, n, tiles_per_program,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    jb, ib = tl.program_id(0), tl.program_id(1)
    n_i, n_j = tl.num_programs(1), tl.num_programs(0)
    offs_j = jb * BLOCK_N + tl.arange(0, BLOCK_N)
    mj = offs_j < n
    w2_part = tl.zeros((BLOCK_N,), dtype=tl.float32).to(t_ptr.dtype.element_ty)
    b2_part = tl.zeros_like(w2_part)
    w3_part = tl.zeros_like(w2_part)
    for k in range(0, tiles_per_program):
        offs_i = (ib * tiles_per_program + k) * BLOCK_B + tl.arange(0, BLOCK_B)
        t, u, a2, a3, h = _tile(t_ptr, w2_ptr, b2_ptr, w3_ptr, B, n, offs_i, offs_j)
        mi = offs_i < B
        gg = tl.load(gg_ptr + offs_i, mask=mi, other=0.0)[:, None]  # 0 outside: masked examples add 0
        gd = tl.load(gd_ptr + offs_i, mask=mi, other=0.0)[:, None]
        s = h * (1.0 - h)
        r = 1.0 - 2.0 * h
        a2r, uc = a2[None, :], u[:, None]
        # Parameter gradients, before the per-unit factors: summed over this program's examples.
        w3_part += tl.sum(gg * (2.0 * h - 1.0) + 4.0 * gd * a2r * s, axis=0)
        b2_part += tl.sum(2.0 * gg * s + 4.0 * gd * a2r * s * r, axis=0)
        w2_part += tl.sum(2.0 * gg * s * uc + 4.0 * gd * s * (1.0 + a2r * r * uc), axis=0)
        # Sums over this program's units, per example: for gamma' and for d gamma' / dt.
        a3a2 = (a3 * a2)[None, :]
        tl.store(part_ptr + (0 * n_j + jb) * B + offs_i, tl.sum(a3a2 * s, axis=1), mask=mi)
        tl.store(part_ptr + (1 * n_j + jb) * B + offs_i, tl.sum(a3a2 * a2r * s * r, axis=1), mask=mi)
    tl.store(acc_ptr + (0 * n_i + ib) * n + offs_j, w2_part, mask=mj)
    tl.store(acc_ptr + (1 * n_i + ib) * n + offs_j, b2_part, mask=mj)
    tl.store(acc_ptr + (2 * n_i + ib) * n + offs_j, w3_part, mask=mj)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _nnet_bwd_finish(t_ptr, w1_ptr, w2_ptr, w3_ptr, gg_ptr, gd_ptr, acc_ptr, part_ptr, grad_t_ptr, grad_w1_ptr,
                     grad_b1_ptr, grad_w2_ptr, grad_b2_ptr, grad_w3_ptr, B, n, n_i, n_j,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SUM: tl.constexpr):
    """Fixed-order sums of the partials: programs ``[0, cdiv(n, BLOCK_N))`` finish the unit
    gradients, the next ``cdiv(B, BLOCK_B)`` the ``t`` gradients, the last one ``w1`` and ``b1``."""
    pid = tl.program_id(0)
    unit_programs = tl.cdiv(n, BLOCK_N)
    example_programs = tl.cdiv(B, BLOCK_B)
    if pid < unit_programs:
        offs_j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mj = offs_j < n
        s_w2 = tl.zeros((BLOCK_N,), dtype=tl.float32).to(t_ptr.dtype.element_ty)
        s_b2 = tl.zeros_like(s_w2)
        s_w3 = tl.zeros_like(s_w2)
        for ib in range(0, n_i):
            s_w2 += tl.load(acc_ptr + (0 * n_i + ib) * n + offs_j, mask=mj, other=0.0)
            s_b2 += tl.load(acc_ptr + (1 * n_i + ib) * n + offs_j, mask=mj, other=0.0)
            s_w3 += tl.load(acc_ptr + (2 * n_i + ib) * n + offs_j, mask=mj, other=0.0)
        w2 = tl.load(w2_ptr + offs_j, mask=mj, other=0.0)
        w3 = tl.load(w3_ptr + offs_j, mask=mj, other=0.0)
        a3 = tl.abs(w3)
        tl.store(grad_w2_ptr + offs_j, _sign(w2) * a3 * s_w2 / n, mask=mj)
        tl.store(grad_b2_ptr + offs_j, a3 * s_b2 / n, mask=mj)
        tl.store(grad_w3_ptr + offs_j, _sign(w3) * s_w3 / n, mask=mj)
    elif pid < unit_programs + example_programs:
        offs_i = (pid - unit_programs) * BLOCK_B + tl.arange(0, BLOCK_B)
        mi = offs_i < B
        pd = tl.zeros((BLOCK_B,), dtype=tl.float32).to(t_ptr.dtype.element_ty)
        pt = tl.zeros_like(pd)
        for jb in range(0, n_j):
            pd += tl.load(part_ptr + (0 * n_j + jb) * B + offs_i, mask=mi, other=0.0)
            pt += tl.load(part_ptr + (1 * n_j + jb) * B + offs_i, mask=mi, other=0.0)
        gg = tl.load(gg_ptr + offs_i, mask=mi, other=0.0)
        gd = tl.load(gd_ptr + offs_i, mask=mi, other=0.0)
        a1 = tl.abs(tl.load(w1_ptr))
        tl.store(grad_t_ptr + offs_i, gg * (a1 + 4.0 * pd / n) + gd * 8.0 * pt / n, mask=mi)
    else:
        sum_gg = tl.zeros((BLOCK_SUM,), dtype=tl.float32).to(t_ptr.dtype.element_ty)
        sum_w1 = tl.zeros_like(sum_gg)
        for i0 in range(0, B, BLOCK_SUM):
            offs_i = i0 + tl.arange(0, BLOCK_SUM)
            mi = offs_i < B
            gg = tl.load(gg_ptr + offs_i, mask=mi, other=0.0)
            sum_gg += gg
            sum_w1 += gg * tl.load(t_ptr + offs_i, mask=mi, other=0.0) + tl.load(gd_ptr + offs_i, mask=mi, other=0.0)
        tl.store(grad_b1_ptr, tl.sum(sum_gg, axis=0))
        tl.store(grad_w1_ptr, _sign(tl.load(w1_ptr)) * tl.sum(sum_w1, axis=0))


def nnet_forward(t, w1, b1, w2, b2, w3):
    B, n = t.shape[0], w2.shape[0]
    gamma, dgamma = torch.empty_like(t), torch.empty_like(t)
    with _device.guard(t):
        _nnet_fwd[(triton.cdiv(B, BLOCK_B),)](t, w1, b1, w2, b2, w3, gamma, dgamma, B, n,
                                              BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N)
    return gamma, dgamma


def nnet_backward(t, w1, b1, w2, b2, w3, grad_gamma, grad_dgamma):
    """Gradients ``(t, w1, b1, w2, b2, w3)`` for upstream gradients of gamma and gamma': two
    launches, the tiles' partials and their fixed-order sums."""
    B, n = t.shape[0], w2.shape[0]
    tiles = triton.cdiv(B, BLOCK_B)
    tiles_per_program = triton.cdiv(tiles, MAX_EXAMPLE_PROGRAMS)
    n_j, n_i = triton.cdiv(n, BLOCK_N), triton.cdiv(tiles, tiles_per_program)
    acc = torch.empty((3, n_i, n), device=t.device, dtype=t.dtype)
    part = torch.empty((2, n_j, B), device=t.device, dtype=t.dtype)
    # 8 warps: with 4, ptxas spills the float64 tile (compile_triton.py); float32 fits either way.
    grads = [torch.empty_like(x) for x in (t, w1, b1, w2, b2, w3)]
    with _device.guard(t):
        _nnet_bwd[(n_j, n_i)](t, w2, b2, w3, grad_gamma, grad_dgamma, acc, part, B, n, tiles_per_program,
                              BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, num_warps=8)
        _nnet_bwd_finish[(n_j + tiles + 1,)](t, w1, w2, w3, grad_gamma, grad_dgamma, acc, part, *grads, B, n, n_i, n_j,
                                             BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_SUM=BLOCK_SUM)
    return tuple(grads)
