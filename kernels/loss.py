"""Triton kernels of the VDM loss terms (math: ``vdm_fast.reference.loss``; the windowed
reconstruction loss is derived in ``csrc/loss.h``, which the C++ CPU kernels share).

Layout: every tensor is a contiguous ``[B, D]`` (``[B]`` per-example values). A launch grid is
1-d, ``B * cdiv(D, BLOCK)`` programs, chunks fastest (no grid axis meets CUDA's 65535 cap on
axes 1 and 2); each program handles one chunk of one example, and the example's row base
``b * D`` is int64 (``B * D`` may pass 2^31 elements). Per-example sums are written as
``[B, n_chunks]`` partials, slot ``b * n_chunks + chunk`` = the program's index, and reduced in
a fixed order afterwards, so results are deterministic (no float atomics) and nothing the size
of the data is written for them.
"""

import torch
import triton
import triton.language as tl

from vdm_fast.kernels import _device

BLOCK = 1024
# As LogMargin in csrc/loss.h: grid points this many nats below the top logit cannot change the
# float32 (float64) sum.
LOG_MARGIN = {torch.float32: 25.0, torch.float64: 50.0}


def _grid(B: int, D: int):
    return (B * triton.cdiv(D, BLOCK),)


def _partials(B: int, D: int, device) -> torch.Tensor:
    # Every program writes its slot, so empty is safe; float64 keeps the two-stage sum exact-ish.
    return torch.empty((B, triton.cdiv(D, BLOCK)), device=device, dtype=torch.float64)


@triton.jit
def _chunk(D, BLOCK: tl.constexpr):
    """``(b, offs, mask)``: this program's example (int64: ``b * D`` may pass 2^31) and chunk."""
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(D, BLOCK)
    offs = (pid % n_chunks) * BLOCK + tl.arange(0, BLOCK)
    return (pid // n_chunks).to(tl.int64), offs, offs < D


# --- diffuse ----------------------------------------------------------------------------------

@triton.jit
def _alpha_sigma(g):
    return tl.sqrt(tl.sigmoid(-g)), tl.sqrt(tl.sigmoid(g))


@triton.jit
def _diffuse_fwd(f_ptr, eps_ptr, gamma_ptr, z_ptr, D, BLOCK: tl.constexpr):
    b, offs, mask = _chunk(D, BLOCK)
    alpha, sigma = _alpha_sigma(tl.load(gamma_ptr + b))
    f = tl.load(f_ptr + b * D + offs, mask=mask)
    eps = tl.load(eps_ptr + b * D + offs, mask=mask)
    tl.store(z_ptr + b * D + offs, alpha * f + sigma * eps, mask=mask)


@triton.jit
def _diffuse_bwd(go_ptr, f_ptr, eps_ptr, gamma_ptr, gf_ptr, geps_ptr, part_ptr, D,
                 BLOCK: tl.constexpr):
    b, offs, mask = _chunk(D, BLOCK)
    alpha, sigma = _alpha_sigma(tl.load(gamma_ptr + b))
    go = tl.load(go_ptr + b * D + offs, mask=mask, other=0.0)
    f = tl.load(f_ptr + b * D + offs, mask=mask, other=0.0)
    eps = tl.load(eps_ptr + b * D + offs, mask=mask, other=0.0)
    tl.store(gf_ptr + b * D + offs, go * alpha, mask=mask)
    tl.store(geps_ptr + b * D + offs, go * sigma, mask=mask)
    # d alpha / d gamma = -alpha sigma^2 / 2, d sigma / d gamma = sigma alpha^2 / 2.
    dg = 0.5 * alpha * sigma * tl.sum((go * (alpha * eps - sigma * f)).to(tl.float64))
    tl.store(part_ptr + tl.program_id(0), dg)


def diffuse_forward(f, eps, gamma):
    B, D = f.shape
    z = torch.empty_like(f)
    with _device.guard(f):
        _diffuse_fwd[_grid(B, D)](f, eps, gamma, z, D, BLOCK=BLOCK)
    return z


def diffuse_backward(grad, f, eps, gamma):
    B, D = f.shape
    grad_f, grad_eps, part = torch.empty_like(f), torch.empty_like(eps), _partials(B, D, f.device)
    with _device.guard(grad):
        _diffuse_bwd[_grid(B, D)](grad, f, eps, gamma, grad_f, grad_eps, part, D, BLOCK=BLOCK)
    return grad_f, grad_eps, part.sum(1).to(gamma.dtype)


# --- sum of squared errors ------------------------------------------------------------------
# r = x - a_b y - c_b w, with y, w optional and a, c per example (absent: 1); see csrc/loss.h.

@triton.jit
def _scaled_term(t_ptr, coef_ptr, b, offs, mask, D, HAS_COEF: tl.constexpr, ACC: tl.constexpr):
    """A chunk of one target operand and its product with the per-example coefficient (absent: 1)."""
    t = tl.load(t_ptr + b * D + offs, mask=mask, other=0.0).to(ACC)
    scaled = t
    if HAS_COEF:
        scaled = tl.load(coef_ptr + b).to(ACC) * t
    return t, scaled


@triton.jit
def _residual(x_ptr, y_ptr, a_ptr, w_ptr, c_ptr, b, offs, mask, D, HAS_Y: tl.constexpr, HAS_A: tl.constexpr,
              HAS_W: tl.constexpr, HAS_C: tl.constexpr, ACC: tl.constexpr):
    r = tl.load(x_ptr + b * D + offs, mask=mask, other=0.0).to(ACC)
    y = tl.zeros_like(r)
    w = tl.zeros_like(r)
    if HAS_Y:
        y, ay = _scaled_term(y_ptr, a_ptr, b, offs, mask, D, HAS_A, ACC)
        r -= ay
    if HAS_W:
        w, cw = _scaled_term(w_ptr, c_ptr, b, offs, mask, D, HAS_C, ACC)
        r -= cw
    return r, y, w


@triton.jit
def _sse_fwd(x_ptr, y_ptr, a_ptr, w_ptr, c_ptr, part_ptr, D, HAS_Y: tl.constexpr,
             HAS_A: tl.constexpr, HAS_W: tl.constexpr, HAS_C: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    b, offs, mask = _chunk(D, BLOCK)
    r, y, w = _residual(x_ptr, y_ptr, a_ptr, w_ptr, c_ptr, b, offs, mask, D, HAS_Y, HAS_A, HAS_W, HAS_C, ACC)
    tl.store(part_ptr + tl.program_id(0), tl.sum((r * r).to(tl.float64)))


@triton.jit
def _sse_bwd(go_ptr, x_ptr, y_ptr, a_ptr, w_ptr, c_ptr, gx_ptr, part_ptr, D, HAS_Y: tl.constexpr,
             HAS_A: tl.constexpr, HAS_W: tl.constexpr, HAS_C: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    b, offs, mask = _chunk(D, BLOCK)
    r, y, w = _residual(x_ptr, y_ptr, a_ptr, w_ptr, c_ptr, b, offs, mask, D, HAS_Y, HAS_A, HAS_W, HAS_C, ACC)
    gx = 2.0 * tl.load(go_ptr + b).to(ACC) * r
    tl.store(gx_ptr + b * D + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    # Partial sums for the coefficients' gradients: -sum grad_x y and -sum grad_x w.
    chunk = tl.program_id(0)  # b * n_chunks + the chunk
    tl.store(part_ptr + chunk, -tl.sum((gx * y).to(tl.float64)))
    tl.store(part_ptr + tl.num_programs(0) + chunk, -tl.sum((gx * w).to(tl.float64)))


def _acc(*tensors):
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def _sse_args(x, y, a, w, c):
    """Pointers (x stands in for an absent tensor, never read) and the constexpr flags."""
    flags = dict(HAS_Y=y is not None, HAS_A=a is not None, HAS_W=w is not None, HAS_C=c is not None,
                 ACC=_acc(x, y, w))
    return [t if t is not None else x for t in (y, a, w, c)], flags


def sse_forward(x, y=None, a=None, w=None, c=None):
    B, D = x.shape
    part = _partials(B, D, x.device)
    ptrs, flags = _sse_args(x, y, a, w, c)
    with _device.guard(x):
        _sse_fwd[_grid(B, D)](x, *ptrs, part, D, BLOCK=BLOCK, **flags)
    return part.sum(1)


def sse_backward(grad, x, y=None, a=None, w=None, c=None):
    """``(grad_x, grad_a, grad_c)``; ``grad_a``/``grad_c`` are ``[B]`` (zero where absent)."""
    B, D = x.shape
    grad_x = torch.empty_like(x)
    n_chunks = triton.cdiv(D, BLOCK)
    part = torch.empty((2, B, n_chunks), device=x.device, dtype=torch.float64)
    ptrs, flags = _sse_args(x, y, a, w, c)
    with _device.guard(grad):
        _sse_bwd[_grid(B, D)](grad, x, *ptrs, grad_x, part, D, BLOCK=BLOCK, **flags)
    grad_a, grad_c = part.sum(2).unbind(0)  # float64; the op casts to its compute dtype
    return grad_x, grad_a, grad_c


# --- reconstruction loss ---------------------------------------------------------------------

@triton.jit
def _recon_setup(x_ptr, eps_ptr, gamma_ptr, D, vocab, log_margin, BLOCK: tl.constexpr):
    """Loads one chunk and finds each element's window (see recon_center and recon_half_width in csrc/loss.h)."""
    b, offs, mask = _chunk(D, BLOCK)
    g = tl.load(gamma_ptr + b)
    # The per-example constants in float64, and with them the arithmetic below (as in
    # csrc/loss.cpp): exp(-gamma) overflows float32 below gamma = -88, where the decoder is exact
    # and the loss 0, not inf * 0.
    g64 = g.to(tl.float64)
    prec, scale = tl.exp(-g64), tl.exp(0.5 * g64)
    step = 2.0 / vocab
    # x not an integer in [0, vocab) (unchecked inside torch.compile) makes u_x, and so the
    # example's loss and gradients, NaN (load_x in csrc/loss.h). NaN fails every comparison.
    xf = tl.load(x_ptr + b * D + offs, mask=mask, other=0).to(tl.float64)
    x_ok = (xf >= 0) & (xf < vocab) & (xf == tl.floor(xf))
    x = tl.where(x_ok, xf, 0.0).to(tl.int32)
    eps = tl.load(eps_ptr + b * D + offs, mask=mask, other=0.0)
    z = (2 * x + 1).to(g.dtype) / vocab - 1.0 + scale.to(g.dtype) * eps
    vf = tl.floor(((z + 1.0) * vocab - 1.0) * 0.5 + 0.5)
    vstar = tl.where(vf >= 0, tl.where(vf > vocab - 1, vocab - 1, vf), 0).to(tl.int32)
    w = z - ((2 * vstar + 1).to(g.dtype) / vocab - 1.0)
    r = tl.sqrt(2.0 * log_margin / prec) / step
    half = tl.where(r < vocab, tl.ceil(r) + 1, vocab).to(tl.int32)  # a NaN r (NaN gamma): all of it
    # The window [vstar - half, vstar + half], or the whole vocabulary when that is smaller.
    n_win = tl.minimum(2 * half + 1, vocab)
    base = tl.where(2 * half + 1 >= vocab, 0, vstar - half)
    ux = tl.where(x_ok, (x - vstar).to(g.dtype) * step, float("nan"))
    return b, offs, mask, prec, scale, step, ux, eps, vstar, w, n_win, base


@triton.jit
def _recon_sums(prec, step, vstar, w, n_win, base, vocab, WANT_GRAD: tl.constexpr):
    s0 = tl.zeros_like(w).to(tl.float64)
    s1 = tl.zeros_like(s0)
    s2 = tl.zeros_like(s0)
    for k in range(0, n_win):
        v = base + k
        u = (v - vstar).to(w.dtype) * step
        e = tl.where((v >= 0) & (v < vocab), tl.exp(prec * u * (w - 0.5 * u)), 0.0).to(tl.float64)
        s0 += e
        if WANT_GRAD:
            s1 += e * u
            s2 += e * u * u
    return s0, s1, s2


@triton.jit
def _recon_fwd(x_ptr, eps_ptr, gamma_ptr, part_ptr, D, vocab, log_margin,
               BLOCK: tl.constexpr):
    b, offs, mask, prec, scale, step, ux, eps, vstar, w, n_win, base = _recon_setup(
        x_ptr, eps_ptr, gamma_ptr, D, vocab, log_margin, BLOCK)
    s0, s1, s2 = _recon_sums(prec, step, vstar, w, n_win, base, vocab, False)
    ux, w = ux.to(tl.float64), w.to(tl.float64)
    loss = tl.log(s0) + 0.5 * prec * ux * (ux - 2.0 * w)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0)))


@triton.jit
def _recon_bwd(go_ptr, x_ptr, eps_ptr, gamma_ptr, geps_ptr, part_ptr, D, vocab,
               log_margin, BLOCK: tl.constexpr):
    b, offs, mask, prec, scale, step, ux, eps, vstar, w, n_win, base = _recon_setup(
        x_ptr, eps_ptr, gamma_ptr, D, vocab, log_margin, BLOCK)
    s0, s1, s2 = _recon_sums(prec, step, vstar, w, n_win, base, vocab, True)
    ux, w = ux.to(tl.float64), w.to(tl.float64)
    du = s1 / s0 - ux
    dz = prec * du
    dprec = w * du + 0.5 * (ux * ux - s2 / s0)
    go = tl.load(go_ptr + b).to(tl.float64)
    tl.store(geps_ptr + b * D + offs, (go * dz * scale).to(eps.dtype), mask=mask)
    dg = tl.where(mask, 0.5 * scale * eps.to(tl.float64) * dz - prec * dprec, 0.0)
    tl.store(part_ptr + tl.program_id(0), go * tl.sum(dg))


def recon_forward(x, eps, gamma, vocab_size):
    B, D = eps.shape
    part = _partials(B, D, eps.device)
    with _device.guard(x):
        _recon_fwd[_grid(B, D)](x, eps, gamma, part, D, vocab_size, LOG_MARGIN[eps.dtype],
                                BLOCK=BLOCK)
    return part.sum(1).to(eps.dtype)


def recon_backward(grad, x, eps, gamma, vocab_size):
    B, D = eps.shape
    grad_eps, part = torch.empty_like(eps), _partials(B, D, eps.device)
    with _device.guard(grad):
        _recon_bwd[_grid(B, D)](grad, x, eps, gamma, grad_eps, part, D, vocab_size,
                                LOG_MARGIN[eps.dtype], BLOCK=BLOCK)
    return grad_eps, part.sum(1).to(gamma.dtype)
