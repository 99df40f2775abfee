"""The VDM loss terms as drop-in ops (math: ``vdm_fast.reference.loss``).

``reconstruction_loss`` is the custom op ``vdm_fast::reconstruction_loss``: the decoder's
log-softmax over the vocabulary is computed on the fly by the compiled kernels, forward and
backward, and the ``[B, D, vocab]`` logits of the reference are never materialised.
"""

import torch
from torch import Tensor

from vdm_fast import _ext
from vdm_fast.ops import _checks
from vdm_fast.reference import loss as ref

# Element dtypes the kernels read x in directly; other dtypes are converted first.
_X_KERNEL_DTYPES = (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 inputs (shared/DESIGN.md section 3)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _xtype(x: Tensor):
    return getattr(_ext._C.XType, str(x.dtype).removeprefix("torch."))


def _fused(device: torch.device) -> bool:
    if _ext.use_reference():
        return False
    if device.type == "cpu":
        return _ext.has_cpu_kernels()
    if device.type == "cuda":
        return _ext.has_cuda_kernels()
    return False


def _launch(kind: str, device: torch.device, *args) -> None:
    """Call the compiled ``recon_<kind>_<device>`` kernel (CUDA ones on the current stream)."""
    if device.type == "cuda":
        getattr(_ext._C, f"recon_{kind}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        getattr(_ext._C, f"recon_{kind}_cpu")(*args)


@torch.library.custom_op("vdm_fast::reconstruction_loss", mutates_args=())
def _reconstruction_loss(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int) -> Tensor:
    x, eps_0, gamma_0 = x.contiguous(), eps_0.contiguous(), gamma_0.contiguous()
    B, D = eps_0.shape
    # Poison-free by construction: every example's sum is written by the kernel.
    out = torch.empty(B, dtype=eps_0.dtype, device=eps_0.device)
    _launch("forward", eps_0.device, x.data_ptr(), _xtype(x), eps_0.data_ptr(), gamma_0.data_ptr(),
            out.data_ptr(), B, D, vocab_size, str(eps_0.dtype).removeprefix("torch."))
    return out


@_reconstruction_loss.register_fake
def _(x, eps_0, gamma_0, vocab_size):
    return eps_0.new_empty(eps_0.shape[0])


@torch.library.custom_op("vdm_fast::reconstruction_loss_backward", mutates_args=())
def _reconstruction_loss_backward(grad: Tensor, x: Tensor, eps_0: Tensor, gamma_0: Tensor,
                                  vocab_size: int) -> tuple[Tensor, Tensor]:
    grad, x = grad.contiguous(), x.contiguous()
    eps_0, gamma_0 = eps_0.contiguous(), gamma_0.contiguous()
    B, D = eps_0.shape
    grad_eps = torch.empty_like(eps_0)
    grad_gamma = torch.empty_like(gamma_0)
    _launch("backward", eps_0.device, x.data_ptr(), _xtype(x), eps_0.data_ptr(), gamma_0.data_ptr(),
            grad.data_ptr(), grad_eps.data_ptr(), grad_gamma.data_ptr(), B, D, vocab_size,
            str(eps_0.dtype).removeprefix("torch."))
    return grad_eps, grad_gamma


@_reconstruction_loss_backward.register_fake
def _(grad, x, eps_0, gamma_0, vocab_size):
    return torch.empty_like(eps_0), torch.empty_like(gamma_0)


def _setup_context(ctx, inputs, output):
    x, eps_0, gamma_0, vocab_size = inputs
    ctx.save_for_backward(x, eps_0, gamma_0)
    ctx.vocab_size = vocab_size


def _backward(ctx, grad):
    x, eps_0, gamma_0 = ctx.saved_tensors
    grad_eps, grad_gamma = _reconstruction_loss_backward(grad, x, eps_0, gamma_0, ctx.vocab_size)
    return None, grad_eps, grad_gamma, None


_reconstruction_loss.register_autograd(_backward, setup_context=_setup_context)


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


def _noise_pair(eps: Tensor, eps_hat: Tensor) -> int:
    _checks.tensor("eps", eps, floating=True)
    _checks.tensor("eps_hat", eps_hat, floating=True)
    B = _checks.batch("eps", eps)
    _checks.same_shape("eps_hat", eps_hat, "eps", eps)
    _checks.same_device("eps_hat", eps_hat, "eps", eps)
    return B


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
    return ref.diffuse(f, eps, gamma)


def diffusion_loss(eps: Tensor, eps_hat: Tensor, dgamma_dt: Tensor) -> Tensor:
    """Continuous-time diffusion loss ``0.5 gamma'(t) ||eps - eps_hat||^2`` per example ``[B]``.

    ``eps_hat`` may be float32, bfloat16 or float16; the sum accumulates in float32 (float64
    for float64 ``eps``).
    """
    B = _noise_pair(eps, eps_hat)
    _checks.per_example("dgamma_dt", dgamma_dt, B, "eps", eps)
    dtype = _compute_dtype(eps)
    return ref.diffusion_loss(eps.to(dtype), eps_hat.to(dtype), dgamma_dt.to(dtype))


def diffusion_loss_discrete(eps: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                            T: int) -> Tensor:
    """T-step diffusion loss ``0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2`` per example."""
    _checks.finite_number("T", T, positive=True, integer=True)
    B = _noise_pair(eps, eps_hat)
    _checks.per_example("gamma_t", gamma_t, B, "eps", eps)
    _checks.per_example("gamma_s", gamma_s, B, "eps", eps)
    dtype = _compute_dtype(eps)
    return ref.diffusion_loss_discrete(eps.to(dtype), eps_hat.to(dtype), gamma_t.to(dtype),
                                       gamma_s.to(dtype), T)


def prior_loss(f: Tensor, gamma_1: Tensor) -> Tensor:
    """``KL(q(z_1 | x) || N(0, I))`` per example ``[B]``; ``gamma_1``: ``gamma(1)`` per example."""
    _checks.tensor("f", f, floating=True)
    B = _checks.batch("f", f)
    _checks.per_example("gamma_1", gamma_1, B, "f", f)
    dtype = _compute_dtype(f)
    return ref.prior_loss(f.to(dtype), gamma_1.to(dtype))
