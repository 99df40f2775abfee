"""Triton kernels of the fused monotone noise schedule (math and gradient formulas in
``csrc/schedule.h``; reference: ``vdm_fast.reference.schedule.nnet``).

Forward: a program per ``BLOCK_B`` examples, looping over the hidden units in tiles.
Backward: a program per (``BLOCK_N`` units, ``BLOCK_B`` examples) tile writes its partial
parameter gradients (summed over its examples) and its partial sums over units (for d/dt);
fixed-order sums over the tiles finish the job, so results are deterministic.
"""

import torch
import triton
import triton.language as tl

BLOCK_B = 32
BLOCK_N = 128


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
def _nnet_bwd(t_ptr, w2_ptr, b2_ptr, w3_ptr, gg_ptr, gd_ptr, acc_ptr, part_ptr, B, n,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    jb, ib = tl.program_id(0), tl.program_id(1)
    offs_j = jb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = ib * BLOCK_B + tl.arange(0, BLOCK_B)
    t, u, a2, a3, h = _tile(t_ptr, w2_ptr, b2_ptr, w3_ptr, B, n, offs_i, offs_j)
    mi = offs_i < B
    gg = tl.load(gg_ptr + offs_i, mask=mi, other=0.0)[:, None]  # 0 outside: masked examples add 0
    gd = tl.load(gd_ptr + offs_i, mask=mi, other=0.0)[:, None]
    s = h * (1.0 - h)
    r = 1.0 - 2.0 * h
    a2r, uc = a2[None, :], u[:, None]
    # Parameter gradients, before the per-unit factors: summed over this tile's examples.
    w3_part = tl.sum(gg * (2.0 * h - 1.0) + 4.0 * gd * a2r * s, axis=0)
    b2_part = tl.sum(2.0 * gg * s + 4.0 * gd * a2r * s * r, axis=0)
    w2_part = tl.sum(2.0 * gg * s * uc + 4.0 * gd * s * (1.0 + a2r * r * uc), axis=0)
    n_i = tl.num_programs(1)
    mj = offs_j < n
    tl.store(acc_ptr + (0 * n_i + ib) * n + offs_j, w2_part, mask=mj)
    tl.store(acc_ptr + (1 * n_i + ib) * n + offs_j, b2_part, mask=mj)
    tl.store(acc_ptr + (2 * n_i + ib) * n + offs_j, w3_part, mask=mj)
    # Sums over this tile's units, per example: for gamma' and for d gamma' / dt.
    a3a2 = (a3 * a2)[None, :]
    n_j = tl.num_programs(0)
    tl.store(part_ptr + (0 * n_j + jb) * B + offs_i, tl.sum(a3a2 * s, axis=1), mask=mi)
    tl.store(part_ptr + (1 * n_j + jb) * B + offs_i, tl.sum(a3a2 * a2r * s * r, axis=1), mask=mi)


def nnet_forward(t, w1, b1, w2, b2, w3):
    B, n = t.shape[0], w2.shape[0]
    gamma, dgamma = torch.empty_like(t), torch.empty_like(t)
    _nnet_fwd[(triton.cdiv(B, BLOCK_B),)](t, w1, b1, w2, b2, w3, gamma, dgamma, B, n,
                                          BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N)
    return gamma, dgamma


def nnet_backward(t, w1, b1, w2, b2, w3, grad_gamma, grad_dgamma):
    """Gradients ``(t, w1, b1, w2, b2, w3)`` for upstream gradients of gamma and gamma'."""
    B, n = t.shape[0], w2.shape[0]
    n_j, n_i = triton.cdiv(n, BLOCK_N), triton.cdiv(B, BLOCK_B)
    acc = torch.empty((3, n_i, n), device=t.device, dtype=t.dtype)
    part = torch.empty((2, n_j, B), device=t.device, dtype=t.dtype)
    _nnet_bwd[(n_j, n_i)](t, w2, b2, w3, grad_gamma, grad_dgamma, acc, part, B, n,
                          BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N)
    acc, part = acc.sum(1), part.sum(1)  # fixed-order sums over the tiles
    a1, a3 = w1.abs().reshape(()), w3.abs().reshape(-1)
    dgamma = a1 + 4.0 * part[0] / n
    grad_t = grad_gamma * dgamma + grad_dgamma * 8.0 * part[1] / n
    grad_w1 = (torch.sign(w1) * (grad_gamma * t + grad_dgamma).sum()).reshape(w1.shape)
    grad_b1 = grad_gamma.sum().reshape(b1.shape)
    grad_w2 = (torch.sign(w2.reshape(-1)) * a3 * acc[0] / n).reshape(w2.shape)
    grad_b2 = a3 * acc[1] / n
    grad_w3 = (torch.sign(w3.reshape(-1)) * acc[2] / n).reshape(w3.shape)
    return grad_t, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3
