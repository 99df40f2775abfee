"""The VDM loss terms as drop-in ops (math: ``vdm_fast.reference.loss``).

Three custom ops carry every per-element pass, each with a C++ CPU kernel (``vdm_fast._C``) and
Triton CUDA kernels (``vdm_fast.kernels.loss``), a fake for ``torch.compile`` and an autograd
formula whose backward is one more custom op:

- ``vdm_fast::diffuse``: the forward process ``z_t = alpha_t f + sigma_t eps``;
- ``vdm_fast::sum_squared_error``: ``sum_d (x - y)^2`` per example, the body of the diffusion
  losses (any float dtypes, accumulated in float32) and of the prior loss (``y`` absent);
- ``vdm_fast::reconstruction_loss``: the decoder's log-softmax over the vocabulary computed on
  the fly, forward and backward; the ``[B, D, vocab]`` logits are never materialised.

The public functions validate their inputs, flatten ``[B, ...]`` to ``[B, D]`` and combine the
ops with the per-example ``[B]`` weights, which cost nothing next to the ``B x D`` passes.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm_fast import _ext
from vdm_fast.ops import _checks
from vdm_fast.reference import loss as ref

# Element dtypes the kernels read x in directly; other dtypes are converted first.
_X_KERNEL_DTYPES = (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """Accumulate in float32, or float64 when an input is float64 (shared/DESIGN.md section 3)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _addr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _triton():
    from vdm_fast.kernels import loss  # imported on first CUDA use: triton is slow to import

    return loss


def _fused(device: torch.device) -> bool:
    """Whether a kernel serves this device (else the op runs the reference)."""
    if _ext.use_reference():
        return False
    if device.type == "cpu":
        return _ext.has_cpu_kernels()
    if device.type == "cuda":
        return _ext.has_triton() or _ext.has_cuda_kernels()
    return False


def _use_cuda_cpp() -> bool:
    return (_ext.cuda_impl() == "cuda" and _ext.has_cuda_kernels()) or not _ext.has_triton()


# --- vdm_fast::diffuse ------------------------------------------------------------------------

@torch.library.custom_op("vdm_fast::diffuse", mutates_args=())
def _diffuse(f: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    f, eps, gamma = f.contiguous(), eps.contiguous(), gamma.contiguous()
    if f.is_cuda:
        return _triton().diffuse_forward(f, eps, gamma)
    z = torch.empty_like(f)
    _ext._C.diffuse_forward_cpu(f.data_ptr(), eps.data_ptr(), gamma.data_ptr(), z.data_ptr(),
                                *f.shape, _name(f.dtype))
    return z


@_diffuse.register_fake
def _(f, eps, gamma):
    return torch.empty_like(f)


@torch.library.custom_op("vdm_fast::diffuse_backward", mutates_args=())
def _diffuse_backward(grad: Tensor, f: Tensor, eps: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad, f, eps, gamma = grad.contiguous(), f.contiguous(), eps.contiguous(), gamma.contiguous()
    if f.is_cuda:
        return _triton().diffuse_backward(grad, f, eps, gamma)
    grad_f, grad_eps, grad_gamma = torch.empty_like(f), torch.empty_like(eps), torch.empty_like(gamma)
    _ext._C.diffuse_backward_cpu(grad.data_ptr(), f.data_ptr(), eps.data_ptr(), gamma.data_ptr(),
                                 grad_f.data_ptr(), grad_eps.data_ptr(), grad_gamma.data_ptr(),
                                 *f.shape, _name(f.dtype))
    return grad_f, grad_eps, grad_gamma


@_diffuse_backward.register_fake
def _(grad, f, eps, gamma):
    return torch.empty_like(f), torch.empty_like(eps), torch.empty_like(gamma)


def _diffuse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _diffuse_grad(ctx, grad):
    return _diffuse_backward(grad, *ctx.saved_tensors)


_diffuse.register_autograd(_diffuse_grad, setup_context=_diffuse_setup)


# --- vdm_fast::sum_squared_error ----------------------------------------------------------------

def _cpu_operand(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The C++ kernels read float32/float64 only: low-precision CPU inputs are widened first."""
    return None if t is None else t.to(dtype).contiguous()


@torch.library.custom_op("vdm_fast::sum_squared_error", mutates_args=())
def _sse(x: Tensor, y: Optional[Tensor]) -> Tensor:
    dtype = _compute_dtype(x, y)
    if x.is_cuda:
        y = None if y is None else y.contiguous()
        return _triton().sse_forward(x.contiguous(), y).to(dtype)
    x, y = _cpu_operand(x, dtype), _cpu_operand(y, dtype)
    out = torch.empty(x.shape[0], dtype=dtype)
    _ext._C.sse_forward_cpu(x.data_ptr(), _addr(y), out.data_ptr(), *x.shape, _name(dtype))
    return out


@_sse.register_fake
def _(x, y):
    return x.new_empty(x.shape[0], dtype=_compute_dtype(x, y))


@torch.library.custom_op("vdm_fast::sum_squared_error_backward", mutates_args=())
def _sse_backward(grad: Tensor, x: Tensor, y: Optional[Tensor]) -> Tensor:
    """``d/dx = 2 grad (x - y)``, in ``x``'s dtype (``d/dy`` is its negative)."""
    dtype = _compute_dtype(x, y)
    if x.is_cuda:
        y = None if y is None else y.contiguous()
        return _triton().sse_backward(grad.contiguous(), x.contiguous(), y)
    # Named, not inline: a temporary copy would be freed before the kernel reads its address.
    grad, x_in, y = _cpu_operand(grad, dtype), _cpu_operand(x, dtype), _cpu_operand(y, dtype)
    grad_x = torch.empty_like(x_in)
    _ext._C.sse_backward_cpu(grad.data_ptr(), x_in.data_ptr(), _addr(y), grad_x.data_ptr(),
                             *x_in.shape, _name(dtype))
    return grad_x.to(x.dtype)


@_sse_backward.register_fake
def _(grad, x, y):
    return torch.empty_like(x)


def _sse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sse_grad(ctx, grad):
    x, y = ctx.saved_tensors
    grad_x = _sse_backward(grad, x, y)
    grad_y = -grad_x.to(y.dtype) if y is not None and ctx.needs_input_grad[1] else None
    return grad_x, grad_y


_sse.register_autograd(_sse_grad, setup_context=_sse_setup)


# --- vdm_fast::reconstruction_loss --------------------------------------------------------------

def _launch_recon(kind: str, x: Tensor, eps_0: Tensor, gamma_0: Tensor, *buffers: int,
                  vocab_size: int) -> None:
    """Run the compiled ``recon_<kind>_<device>`` kernel (CUDA ones on the current stream)."""
    xtype = getattr(_ext._C.XType, _name(x.dtype))
    args = (x.data_ptr(), xtype, eps_0.data_ptr(), gamma_0.data_ptr(), *buffers, *eps_0.shape,
            vocab_size, _name(eps_0.dtype))
    if eps_0.is_cuda:
        getattr(_ext._C, f"recon_{kind}_cuda")(*args, torch.cuda.current_stream(eps_0.device).cuda_stream)
    else:
        getattr(_ext._C, f"recon_{kind}_cpu")(*args)


@torch.library.custom_op("vdm_fast::reconstruction_loss", mutates_args=())
def _reconstruction_loss(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int) -> Tensor:
    x, eps_0, gamma_0 = x.contiguous(), eps_0.contiguous(), gamma_0.contiguous()
    if eps_0.is_cuda and not _use_cuda_cpp():
        return _triton().recon_forward(x, eps_0, gamma_0, vocab_size)
    out = torch.empty(eps_0.shape[0], dtype=eps_0.dtype, device=eps_0.device)
    _launch_recon("forward", x, eps_0, gamma_0, out.data_ptr(), vocab_size=vocab_size)
    return out


@_reconstruction_loss.register_fake
def _(x, eps_0, gamma_0, vocab_size):
    return eps_0.new_empty(eps_0.shape[0])


@torch.library.custom_op("vdm_fast::reconstruction_loss_backward", mutates_args=())
def _reconstruction_loss_backward(grad: Tensor, x: Tensor, eps_0: Tensor, gamma_0: Tensor,
                                  vocab_size: int) -> tuple[Tensor, Tensor]:
    grad, x = grad.contiguous(), x.contiguous()
    eps_0, gamma_0 = eps_0.contiguous(), gamma_0.contiguous()
    if eps_0.is_cuda and not _use_cuda_cpp():
        return _triton().recon_backward(grad, x, eps_0, gamma_0, vocab_size)
    grad_eps, grad_gamma = torch.empty_like(eps_0), torch.empty_like(gamma_0)
    _launch_recon("backward", x, eps_0, gamma_0, grad.data_ptr(), grad_eps.data_ptr(),
                  grad_gamma.data_ptr(), vocab_size=vocab_size)
    return grad_eps, grad_gamma


@_reconstruction_loss_backward.register_fake
def _(grad, x, eps_0, gamma_0, vocab_size):
    return torch.empty_like(eps_0), torch.empty_like(gamma_0)


def _recon_setup(ctx, inputs, output):
    x, eps_0, gamma_0, vocab_size = inputs
    ctx.save_for_backward(x, eps_0, gamma_0)
    ctx.vocab_size = vocab_size


def _recon_grad(ctx, grad):
    x, eps_0, gamma_0 = ctx.saved_tensors
    grad_eps, grad_gamma = _reconstruction_loss_backward(grad, x, eps_0, gamma_0, ctx.vocab_size)
    return None, grad_eps, grad_gamma, None


_reconstruction_loss.register_autograd(_recon_grad, setup_context=_recon_setup)


# --- public functions -------------------------------------------------------------------------

def diffuse(f: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """The forward process ``z_t = sqrt(sigmoid(-gamma)) f + sqrt(sigmoid(gamma)) eps``.

    ``f``, ``eps``: ``[B, ...]``; ``gamma``: ``[B]``. Gradients flow to all three.
    """
    _checks.tensor("f", f, floating=True)
    B = _checks.batch("f", f)
    _checks.tensor("eps", eps, floating=True)
    _checks.same_shape("eps", eps, "f", f)
    _checks.same_device("eps", eps, "f", f)
    _checks.per_example("gamma", gamma, B, "f", f)
    dtype = _compute_dtype(f, eps, gamma)
    f, eps, gamma = f.to(dtype), eps.to(dtype), gamma.to(dtype)
    if not _fused(f.device):
        return ref.diffuse(f, eps, gamma)
    return _diffuse(f.reshape(B, -1), eps.reshape(B, -1), gamma).reshape(f.shape)


def _sum_squared_error(x: Tensor, y: Optional[Tensor]) -> Tensor:
    B = x.shape[0]
    if not _fused(x.device):
        dtype = _compute_dtype(x, y)
        d = x.to(dtype) if y is None else x.to(dtype) - y.to(dtype)
        return d.reshape(B, -1).square().sum(1)
    return _sse(x.reshape(B, -1), None if y is None else y.reshape(B, -1))


def _noise_pair(eps: Tensor, eps_hat: Tensor) -> int:
    _checks.tensor("eps", eps, floating=True)
    _checks.tensor("eps_hat", eps_hat, floating=True)
    B = _checks.batch("eps", eps)
    _checks.same_shape("eps_hat", eps_hat, "eps", eps)
    _checks.same_device("eps_hat", eps_hat, "eps", eps)
    return B


def diffusion_loss(eps: Tensor, eps_hat: Tensor, dgamma_dt: Tensor) -> Tensor:
    """Continuous-time diffusion loss ``0.5 gamma'(t) ||eps - eps_hat||^2`` per example ``[B]``.

    ``eps_hat`` may be float32, bfloat16 or float16; the sum accumulates in float32 (float64
    for float64 inputs).
    """
    B = _noise_pair(eps, eps_hat)
    _checks.per_example("dgamma_dt", dgamma_dt, B, "eps", eps)
    return 0.5 * dgamma_dt.to(_compute_dtype(eps)) * _sum_squared_error(eps_hat, eps)


def diffusion_loss_discrete(eps: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                            T: int) -> Tensor:
    """T-step diffusion loss ``0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2`` per example."""
    _checks.finite_number("T", T, positive=True, integer=True)
    B = _noise_pair(eps, eps_hat)
    _checks.per_example("gamma_t", gamma_t, B, "eps", eps)
    _checks.per_example("gamma_s", gamma_s, B, "eps", eps)
    dtype = _compute_dtype(eps)
    weight = 0.5 * T * torch.expm1(gamma_t.to(dtype) - gamma_s.to(dtype))
    return weight * _sum_squared_error(eps_hat, eps)


def prior_loss(f: Tensor, gamma_1: Tensor) -> Tensor:
    """``KL(q(z_1 | x) || N(0, I))`` per example ``[B]``; ``gamma_1``: ``gamma(1)`` per example.

    Written as ``0.5 sigmoid(-gamma_1) ||f||^2 + 0.5 D (sigma_1^2 - log sigma_1^2 - 1)``: one
    pass over ``f`` (``log sigmoid`` keeps large ``|gamma_1|`` finite).
    """
    _checks.tensor("f", f, floating=True)
    B = _checks.batch("f", f)
    _checks.per_example("gamma_1", gamma_1, B, "f", f)
    g = gamma_1.to(_compute_dtype(f))
    dims = f[0].numel()
    return 0.5 * torch.sigmoid(-g) * _sum_squared_error(f, None) + \
        0.5 * dims * (torch.sigmoid(g) - F.logsigmoid(g) - 1.0)


def reconstruction_loss(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int = 256) -> Tensor:
    """``-log p(x | z_0)`` per example ``[B]``, in nats.

    ``x``: integer-valued images ``[B, ...]`` in ``[0, vocab_size)``, any integer or float dtype.
    ``eps_0``: the noise of ``z_0``, shape of ``x``. ``gamma_0``: ``gamma(0)`` per example ``[B]``.
    Gradients flow to ``eps_0`` and ``gamma_0``.
    """
    _checks.finite_number("vocab_size", vocab_size, positive=True, integer=True)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    _checks.tensor("eps_0", eps_0, floating=True)
    B = _checks.batch("eps_0", eps_0)
    _checks.images("x", x, vocab_size)
    _checks.same_shape("x", x, "eps_0", eps_0)
    _checks.same_device("x", x, "eps_0", eps_0)
    _checks.per_example("gamma_0", gamma_0, B, "eps_0", eps_0)

    dtype = _compute_dtype(eps_0)
    eps_0, gamma_0 = eps_0.to(dtype), gamma_0.to(dtype)
    if not _fused(eps_0.device):
        return ref.reconstruction_loss(x, eps_0, gamma_0, vocab_size)
    if x.dtype not in _X_KERNEL_DTYPES:
        x = x.to(torch.float32 if x.is_floating_point() else torch.int32)
    return _reconstruction_loss(x.reshape(B, -1), eps_0.reshape(B, -1), gamma_0, vocab_size)


class VLBTerms(NamedTuple):
    """Per-example terms of the variational bound, in nats, and their total in bits per dim."""

    reconstruction: Tensor
    prior: Tensor
    diffusion: Tensor
    bpd: Tensor


def vlb_terms(x: Tensor, eps: Tensor, eps_hat: Tensor, eps_0: Tensor, gamma_t: Tensor,
              gamma_0: Tensor, gamma_1: Tensor, *, dgamma_dt: Optional[Tensor] = None,
              gamma_s: Optional[Tensor] = None, T: int = 0, vocab_size: int = 256) -> VLBTerms:
    """The three terms of the bound and bits per dim, per example, from a trainer's tensors.

    ``x``: integer images ``[B, ...]``; ``eps``: the noise that made ``z_t``; ``eps_hat``: the
    model's prediction; ``eps_0``: fresh noise for the reconstruction term; ``gamma_t``,
    ``gamma_0``, ``gamma_1``: ``[B]``. Continuous time (``T = 0``) needs ``dgamma_dt``; ``T``
    steps need ``gamma_s``.
    """
    _checks.finite_number("T", T, integer=True)
    if T < 0:
        raise ValueError(f"T must be >= 0 (0: continuous time), got {T}")
    if T == 0:
        if dgamma_dt is None:
            raise ValueError("dgamma_dt is required for the continuous-time loss (T = 0)")
        diffusion = diffusion_loss(eps, eps_hat, dgamma_dt)
    else:
        if gamma_s is None:
            raise ValueError(f"gamma_s is required for the T-step loss (T = {T})")
        diffusion = diffusion_loss_discrete(eps, eps_hat, gamma_t, gamma_s, T)
    reconstruction = reconstruction_loss(x, eps_0, gamma_0, vocab_size)
    prior = prior_loss(ref.encode(x, vocab_size, _compute_dtype(eps)), gamma_1)
    bpd = (reconstruction + prior + diffusion) / (x[0].numel() * math.log(2.0))
    return VLBTerms(reconstruction, prior, diffusion, bpd)
