"""The VDM loss terms as drop-in ops (math: ``vdm_fast.reference.loss``).

Three custom ops carry every per-element pass, each with a C++ CPU kernel (``vdm_fast._C``) and
a Triton kernel (``vdm_fast.kernels.loss``) registered under its dispatch key, a fake for
``torch.compile`` and an autograd formula whose backward is one more custom op:

- ``vdm_fast::diffuse``: the forward process ``z_t = alpha_t f + sigma_t eps``;
- ``vdm_fast::sum_squared_error``: ``sum_d (x - a y - c w)^2`` per example (``a``, ``c``: per-
  example coefficients): the body of the diffusion losses for eps, x, v and score predictions
  (any float dtypes, accumulated in float32) and of the prior loss (``y``, ``w`` absent);
- ``vdm_fast::reconstruction_loss``: the decoder's log-softmax over the vocabulary computed on
  the fly, forward and backward; the ``[B, D, vocab]`` logits are never materialised.

The ops take ``[B, ...]`` tensors (the kernels read them as ``[B, D]``: no reshape is dispatched
on the host). The public functions validate their inputs, then either run the reference function
of the same name (``vdm_fast.backend`` decides) or combine the ops with the per-example ``[B]``
weights.
"""

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm_fast import backend
from vdm_fast import validate
from vdm_fast.ops._library import cast, dtype_name, kernel_op
from vdm_fast.reference import loss as ref
from vdm_fast.diffusion import parameterization as param
from vdm_fast.diffusion import pixels

# Element dtypes the kernels read x in directly; other dtypes are converted first.
_X_KERNEL_DTYPES = (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)

_C = backend.cpu_kernels
_triton = functools.partial(backend.triton_kernels, "loss")


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """Accumulate in float32, or float64 when an input is float64 (docs/design/numerics.md)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _fused(device: torch.device) -> bool:
    return backend.implementation("loss", device) != "reference"


def _addr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _rows(t: Tensor) -> tuple[int, int]:
    """``(B, D)`` of a ``[B, ...]`` tensor, as the C++ kernels read it."""
    B = t.shape[0]
    return B, (t.numel() // B if B else 0)


def _flat(*tensors):
    """``[B, ...]`` tensors as the contiguous ``[B, D]`` the Triton kernels take."""
    return [None if t is None else t.reshape(t.shape[0], -1).contiguous() for t in tensors]


# --- vdm_fast::diffuse ------------------------------------------------------------------------

def _diffuse_cpu(f: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    f, eps, gamma = _contiguous(f, eps, gamma)
    z = torch.empty_like(f)
    _C.diffuse_forward_cpu(f.data_ptr(), eps.data_ptr(), gamma.data_ptr(), z.data_ptr(), *_rows(f),
                           dtype_name(f.dtype))
    return z


def _diffuse_triton(f, eps, gamma):
    return _triton().diffuse_forward(*_flat(f, eps), gamma.contiguous()).reshape(f.shape)


_diffuse = kernel_op("diffuse", "loss", cpu=_diffuse_cpu, triton=_diffuse_triton)


@_diffuse.register_fake
def _(f, eps, gamma):
    return torch.empty_like(f)


def _diffuse_backward_cpu(grad: Tensor, f: Tensor, eps: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad, f, eps, gamma = _contiguous(grad, f, eps, gamma)
    grad_f, grad_eps, grad_gamma = torch.empty_like(f), torch.empty_like(eps), torch.empty_like(gamma)
    _C.diffuse_backward_cpu(grad.data_ptr(), f.data_ptr(), eps.data_ptr(), gamma.data_ptr(), grad_f.data_ptr(),
                            grad_eps.data_ptr(), grad_gamma.data_ptr(), *_rows(f), dtype_name(f.dtype))
    return grad_f, grad_eps, grad_gamma


def _diffuse_backward_triton(grad, f, eps, gamma):
    grad_f, grad_eps, grad_gamma = _triton().diffuse_backward(*_flat(grad, f, eps), gamma.contiguous())
    return grad_f.reshape(f.shape), grad_eps.reshape(eps.shape), grad_gamma


_diffuse_backward = kernel_op("diffuse_backward", "loss", cpu=_diffuse_backward_cpu, triton=_diffuse_backward_triton)


@_diffuse_backward.register_fake
def _(grad, f, eps, gamma):
    return torch.empty_like(f), torch.empty_like(eps), torch.empty_like(gamma)


def _diffuse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _diffuse_grad(ctx, grad):
    return _diffuse_backward(grad, *ctx.saved_tensors)


_diffuse.register_autograd(_diffuse_grad, setup_context=_diffuse_setup)


# --- vdm_fast::sum_squared_error ----------------------------------------------------------------
# sum_d (x - a y - c w)^2 per example: x a prediction, the target a per-example combination of
# y and w (a, c: [B], absent = 1; y, w absent = no term). Covers the eps, x, v and score losses
# (vdm_fast.diffusion.parameterization) and the prior's sum of squares in one pass.

def _cpu_operand(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The C++ kernels read float32/float64 only: low-precision CPU inputs are widened first."""
    return None if t is None else cast(t, dtype).contiguous()


def _sse_cpu(x: Tensor, y: Optional[Tensor], a: Optional[Tensor], w: Optional[Tensor],
             c: Optional[Tensor]) -> Tensor:
    dtype = _compute_dtype(x, y, w)
    x, y, a, w, c = _cpu_operand(x, dtype), _cpu_operand(y, dtype), _cpu_operand(a, dtype), \
        _cpu_operand(w, dtype), _cpu_operand(c, dtype)
    out = x.new_empty(x.shape[0])
    _C.sse_forward_cpu(x.data_ptr(), _addr(y), _addr(a), _addr(w), _addr(c), out.data_ptr(), *_rows(x),
                       dtype_name(dtype))
    return out


def _sse_triton(x, y, a, w, c):
    fx, fy, fw = _flat(x, y, w)
    return _triton().sse_forward(fx, fy, *_contiguous(a), fw, *_contiguous(c)).to(_compute_dtype(x, y, w))


_sse = kernel_op("sum_squared_error", "loss", cpu=_sse_cpu, triton=_sse_triton)


@_sse.register_fake
def _(x, y, a, w, c):
    return x.new_empty(x.shape[0], dtype=_compute_dtype(x, y, w))


def _sse_backward_cpu(grad: Tensor, x: Tensor, y: Optional[Tensor], a: Optional[Tensor], w: Optional[Tensor],
                      c: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``d/dx = 2 grad r`` (in ``x``'s dtype; ``d/dy = -a d/dx``, ``d/dw = -c d/dx``) and the
    per-example ``d/da = -sum d/dx y``, ``d/dc = -sum d/dx w`` (zero where absent)."""
    dtype = _compute_dtype(x, y, w)
    # Named, not inline: a temporary copy would be freed before the kernel reads its address.
    grad, x_in, y, a, w, c = _cpu_operand(grad, dtype), _cpu_operand(x, dtype), _cpu_operand(y, dtype), \
        _cpu_operand(a, dtype), _cpu_operand(w, dtype), _cpu_operand(c, dtype)
    grad_x = torch.empty_like(x_in)
    grad_a, grad_c = torch.empty_like(grad), torch.empty_like(grad)
    _C.sse_backward_cpu(grad.data_ptr(), x_in.data_ptr(), _addr(y), _addr(a), _addr(w), _addr(c), grad_x.data_ptr(),
                        grad_a.data_ptr(), grad_c.data_ptr(), *_rows(x_in), dtype_name(dtype))
    return cast(grad_x, x.dtype), grad_a, grad_c


def _sse_backward_triton(grad, x, y, a, w, c):
    dtype = _compute_dtype(x, y, w)
    fx, fy, fw = _flat(x, y, w)
    grad_x, grad_a, grad_c = _triton().sse_backward(grad.contiguous(), fx, fy, *_contiguous(a), fw, *_contiguous(c))
    return grad_x.reshape(x.shape), grad_a.to(dtype), grad_c.to(dtype)


_sse_backward = kernel_op("sum_squared_error_backward", "loss", cpu=_sse_backward_cpu, triton=_sse_backward_triton)


@_sse_backward.register_fake
def _(grad, x, y, a, w, c):
    dtype = _compute_dtype(x, y, w)
    return torch.empty_like(x), grad.new_empty(x.shape[0], dtype=dtype), grad.new_empty(x.shape[0], dtype=dtype)


def _sse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sse_grad(ctx, grad):
    x, y, a, w, c = ctx.saved_tensors
    grad_x, grad_a, grad_c = _sse_backward(grad, x, y, a, w, c)
    needs = ctx.needs_input_grad

    def term(t, coef):  # the gradient of y (or w): -coef * grad_x, in t's dtype
        scale = 1.0 if coef is None else cast(coef.reshape(-1, *[1] * (grad_x.dim() - 1)), grad_x.dtype)
        return cast(-scale * grad_x, t.dtype)

    return (grad_x,
            term(y, a) if y is not None and needs[1] else None,
            cast(grad_a, a.dtype) if a is not None and needs[2] else None,
            term(w, c) if w is not None and needs[3] else None,
            cast(grad_c, c.dtype) if c is not None and needs[4] else None)


_sse.register_autograd(_sse_grad, setup_context=_sse_setup)


# --- vdm_fast::reconstruction_loss --------------------------------------------------------------

def _recon_cpu(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int) -> Tensor:
    x, eps_0, gamma_0 = _contiguous(x, eps_0, gamma_0)
    out = eps_0.new_empty(eps_0.shape[0])
    _C.recon_forward_cpu(x.data_ptr(), getattr(_C.XType, dtype_name(x.dtype)), eps_0.data_ptr(), gamma_0.data_ptr(),
                         out.data_ptr(), *_rows(eps_0), vocab_size, dtype_name(eps_0.dtype))
    return out


def _recon_triton(x, eps_0, gamma_0, vocab_size):
    return _triton().recon_forward(*_flat(x, eps_0), gamma_0.contiguous(), vocab_size)


_reconstruction_loss = kernel_op("reconstruction_loss", "loss", cpu=_recon_cpu, triton=_recon_triton)


@_reconstruction_loss.register_fake
def _(x, eps_0, gamma_0, vocab_size):
    return eps_0.new_empty(eps_0.shape[0])


def _recon_backward_cpu(grad: Tensor, x: Tensor, eps_0: Tensor, gamma_0: Tensor,
                        vocab_size: int) -> tuple[Tensor, Tensor]:
    grad, x, eps_0, gamma_0 = _contiguous(grad, x, eps_0, gamma_0)
    grad_eps, grad_gamma = torch.empty_like(eps_0), torch.empty_like(gamma_0)
    _C.recon_backward_cpu(x.data_ptr(), getattr(_C.XType, dtype_name(x.dtype)), eps_0.data_ptr(),
                          gamma_0.data_ptr(), grad.data_ptr(), grad_eps.data_ptr(), grad_gamma.data_ptr(),
                          *_rows(eps_0), vocab_size, dtype_name(eps_0.dtype))
    return grad_eps, grad_gamma


def _recon_backward_triton(grad, x, eps_0, gamma_0, vocab_size):
    grad_eps, grad_gamma = _triton().recon_backward(grad.contiguous(), *_flat(x, eps_0), gamma_0.contiguous(),
                                                    vocab_size)
    return grad_eps.reshape(eps_0.shape), grad_gamma


_reconstruction_loss_backward = kernel_op("reconstruction_loss_backward", "loss", cpu=_recon_backward_cpu,
                                          triton=_recon_backward_triton)


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
    validate.tensor("f", f, floating=True)
    B = validate.batch("f", f)
    validate.tensor("eps", eps, floating=True)
    validate.same_shape("eps", eps, "f", f)
    validate.same_device("eps", eps, "f", f)
    gamma = validate.per_example("gamma", gamma, B, "f", f)
    dtype = _compute_dtype(f, eps)  # gamma's dtype never changes the output's
    f, eps, gamma = cast(f, dtype), cast(eps, dtype), cast(gamma, dtype)
    if not _fused(f.device):
        return ref.diffuse(f, eps, gamma)
    return _diffuse(f, eps, gamma)


def _noise_pair(eps: Tensor, eps_hat: Tensor) -> int:
    validate.tensor("eps", eps, floating=True)
    validate.tensor("eps_hat", eps_hat, floating=True)
    B = validate.batch("eps", eps)
    validate.same_shape("eps_hat", eps_hat, "eps", eps)
    validate.same_device("eps_hat", eps_hat, "eps", eps)
    return B


def _prediction_inputs(eps: Tensor, prediction: str, x: Optional[Tensor], gamma_t: Optional[Tensor], *,
                       gamma_t_checked: bool = False):
    """``(x, gamma_t)`` of a prediction's loss, checked whenever given (even where this prediction
    does not use them; ``gamma_t_checked``: the caller has made it ``[B]`` in the loss's dtype),
    ``gamma_t`` as ``[B]`` in the loss's dtype; refuses a missing one."""
    param.check_prediction(prediction)
    if gamma_t is not None and not gamma_t_checked:
        gamma_t = cast(validate.per_example("gamma_t", gamma_t, eps.shape[0], "eps", eps), _compute_dtype(eps))
    if x is not None:
        validate.tensor("x", x, floating=True)
        validate.same_shape("x", x, "eps", eps)
        validate.same_device("x", x, "eps", eps)
    if prediction != "eps" and gamma_t is None:
        raise ValueError(f"gamma_t is required for prediction={prediction!r}")
    if prediction in ("x", "v") and x is None:
        raise ValueError(f"x (the encoded data) is required for prediction={prediction!r}")
    return x, gamma_t


def _prediction_error(eps: Tensor, pred: Tensor, prediction: str, x: Optional[Tensor],
                      gamma_t: Optional[Tensor]) -> Tensor:
    """``vdm_fast.reference.loss.prediction_error`` as one fused pass: ``s^2 ||target - pred||^2``
    with the target a per-example combination of ``eps`` and ``x``, no conversion of ``pred``."""
    if prediction == "eps":
        return _sse(pred, eps, None, None, None)
    a, c, s2 = param.target_terms(prediction, gamma_t)
    if prediction == "x":  # the target is x itself: no coefficient to carry
        return s2 * _sse(pred, x, None, None, None)
    return s2 * _sse(pred, eps, a, x if c is not None else None, c)


def diffusion_loss(eps: Tensor, eps_hat: Tensor, dgamma_dt: Tensor, *, prediction: str = "eps",
                   x: Optional[Tensor] = None, gamma_t: Optional[Tensor] = None) -> Tensor:
    """Continuous-time diffusion loss ``0.5 gamma'(t) ||eps - eps_hat||^2`` per example ``[B]``.

    ``eps_hat`` is the network's output, a prediction of ``prediction`` kind: ``"eps"``
    (default), ``"x"``, ``"v"`` or ``"score"``; the other kinds need ``gamma_t`` and, for x and v,
    ``x`` (the encoded data). The loss is the same for equivalent predictions. Low-precision
    predictions (bf16, fp16) are read as they are; sums accumulate in float32 (float64 for
    float64 ``eps``).
    """
    B = _noise_pair(eps, eps_hat)
    dtype = _compute_dtype(eps)
    dgamma_dt = cast(validate.per_example("dgamma_dt", dgamma_dt, B, "eps", eps), dtype)
    x, gamma_t = _prediction_inputs(eps, prediction, x, gamma_t)
    if not _fused(eps.device):
        return ref.diffusion_loss(cast(eps, dtype), eps_hat, dgamma_dt, prediction=prediction, x=x, gamma_t=gamma_t)
    return 0.5 * dgamma_dt * _prediction_error(eps, eps_hat, prediction, x, gamma_t)


def diffusion_loss_discrete(eps: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                            T: int, *, prediction: str = "eps", x: Optional[Tensor] = None) -> Tensor:
    """T-step diffusion loss ``0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2`` per example
    (``prediction`` and ``x`` as in ``diffusion_loss``)."""
    validate.finite_number("T", T, positive=True, integer=True)
    B = _noise_pair(eps, eps_hat)
    dtype = _compute_dtype(eps)
    gamma_t = cast(validate.per_example("gamma_t", gamma_t, B, "eps", eps), dtype)
    gamma_s = cast(validate.per_example("gamma_s", gamma_s, B, "eps", eps), dtype)
    x, _ = _prediction_inputs(eps, prediction, x, gamma_t, gamma_t_checked=True)
    if not _fused(eps.device):
        return ref.diffusion_loss_discrete(cast(eps, dtype), eps_hat, gamma_t, gamma_s, T, prediction=prediction, x=x)
    weight = 0.5 * T * torch.expm1(gamma_t - gamma_s)
    return weight * _prediction_error(eps, eps_hat, prediction, x, gamma_t)


def prior_loss(f: Tensor, gamma_1: Tensor) -> Tensor:
    """``KL(q(z_1 | x) || N(0, I))`` per example ``[B]``; ``gamma_1``: ``gamma(1)`` per example.

    Written as ``0.5 sigmoid(-gamma_1) ||f||^2 + 0.5 D (sigma_1^2 - log sigma_1^2 - 1)``: one
    pass over ``f`` (``log sigmoid`` keeps large ``|gamma_1|`` finite).
    """
    validate.tensor("f", f, floating=True)
    B = validate.batch("f", f)
    gamma_1 = validate.per_example("gamma_1", gamma_1, B, "f", f)
    dtype = _compute_dtype(f)
    g = cast(gamma_1, dtype)
    if not _fused(f.device):
        return ref.prior_loss(cast(f, dtype), g)
    # 0.5 D (sigma^2 - log sigma^2 - 1) = 0.5 D (softplus(-g) - alpha^2), with alpha^2 = sigmoid(-g):
    # the same value in fewer [B]-sized ops, each a dispatch on the host.
    dims = f.numel() // B
    neg = -g
    alpha2 = torch.sigmoid(neg)
    sse = _sse(f, None, None, None, None)
    return (0.5 * dims) * torch.addcmul(F.softplus(neg), alpha2, sse - dims, value=1.0 / dims)


def reconstruction_loss(x: Tensor, eps_0: Tensor, gamma_0: Tensor, vocab_size: int = 256) -> Tensor:
    """``-log p(x | z_0)`` per example ``[B]``, in nats.

    ``x``: integer-valued images ``[B, ...]`` in ``[0, vocab_size)``, any integer or float dtype.
    ``eps_0``: the noise of ``z_0``, shape of ``x``. ``gamma_0``: ``gamma(0)`` per example ``[B]``.
    Gradients flow to ``eps_0`` and ``gamma_0``.
    """
    validate.vocab("vocab_size", vocab_size)
    validate.tensor("eps_0", eps_0, floating=True)
    B = validate.batch("eps_0", eps_0)
    validate.images("x", x, vocab_size)
    validate.same_shape("x", x, "eps_0", eps_0)
    validate.same_device("x", x, "eps_0", eps_0)
    gamma_0 = validate.per_example("gamma_0", gamma_0, B, "eps_0", eps_0)

    dtype = _compute_dtype(eps_0)
    eps_0, gamma_0 = cast(eps_0, dtype), cast(gamma_0, dtype)
    if not _fused(eps_0.device):
        return ref.reconstruction_loss(x, eps_0, gamma_0, vocab_size)
    if x.dtype not in _X_KERNEL_DTYPES:
        x = x.to(torch.float32 if x.is_floating_point() else torch.int32)
    return _reconstruction_loss(x, eps_0, gamma_0, vocab_size)


def encode(x: Tensor, vocab_size: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer images ``[B, ...]`` in ``[0, vocab_size)`` to the model's data space
    ``f = (2 x + 1) / vocab_size - 1``, checked: float images in ``[0, 1]`` are refused with the
    conversion to use (``(img * 255).round()``)."""
    validate.vocab("vocab_size", vocab_size)
    validate.images("x", x, vocab_size)
    if dtype not in validate.FLOATS:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return pixels.encode(x, vocab_size, dtype)


class VLBTerms(NamedTuple):
    """Per-example terms of the variational bound, in nats, and their total in bits per dim."""

    reconstruction: Tensor
    prior: Tensor
    diffusion: Tensor
    bpd: Tensor


def vlb_terms(x: Tensor, eps: Tensor, eps_hat: Tensor, eps_0: Tensor, gamma_t: Tensor,
              gamma_0: Tensor, gamma_1: Tensor, *, dgamma_dt: Optional[Tensor] = None,
              gamma_s: Optional[Tensor] = None, T: int = 0, vocab_size: int = 256,
              prediction: str = "eps") -> VLBTerms:
    """The three terms of the bound and bits per dim, per example, from a trainer's tensors.

    ``x``: integer images ``[B, ...]``; ``eps``: the noise that made ``z_t``; ``eps_hat``: the
    model's prediction; ``eps_0``: fresh noise for the reconstruction term; ``gamma_t``,
    ``gamma_0``, ``gamma_1``: ``[B]``. Continuous time (``T = 0``) needs ``dgamma_dt``; ``T``
    steps need ``gamma_s``. ``eps_hat`` may be an x, v or score prediction (``prediction``).
    """
    validate.finite_number("T", T, integer=True)
    if T < 0:
        raise ValueError(f"T must be >= 0 (0: continuous time), got {T}")
    _noise_pair(eps, eps_hat)
    validate.vocab("vocab_size", vocab_size)
    # x's values are checked once, by reconstruction_loss below (a host sync each time).
    validate.tensor("x", x)
    validate.same_shape("x", x, "eps", eps)
    validate.same_device("x", x, "eps", eps)
    f = pixels.encode(x, vocab_size, _compute_dtype(eps))
    if T == 0:
        if dgamma_dt is None:
            raise ValueError("dgamma_dt is required for the continuous-time loss (T = 0)")
        diffusion = diffusion_loss(eps, eps_hat, dgamma_dt, prediction=prediction, x=f, gamma_t=gamma_t)
    else:
        if gamma_s is None:
            raise ValueError(f"gamma_s is required for the T-step loss (T = {T})")
        diffusion = diffusion_loss_discrete(eps, eps_hat, gamma_t, gamma_s, T, prediction=prediction, x=f)
    reconstruction = reconstruction_loss(x, eps_0, gamma_0, vocab_size)
    prior = prior_loss(f, gamma_1)
    bpd = pixels.bits_per_dim(reconstruction + prior + diffusion, x[0].numel())
    return VLBTerms(reconstruction, prior, diffusion, bpd)
