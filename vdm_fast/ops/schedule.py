"""The learned monotone noise schedule as a fused op (math: ``vdm_fast.reference.schedule``;
kernels: ``csrc/schedule.*`` and ``kernels/schedule.py``).

``vdm_fast::gamma_nnet`` returns ``gamma(t)`` and ``gamma'(t)`` in one pass; its backward
takes upstream gradients of both and returns the gradients of ``t`` and of the five parameters
in one more pass, analytically: no autograd graph of the network and no double backward.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from vdm_fast import backend
from vdm_fast import validate
from vdm_fast.ops._library import dtype_name, kernel_op
from vdm_fast.reference import schedule as ref

PARAMS = ("w1", "b1", "w2", "b2", "w3")

_C = backend.cpu_kernels
_triton = functools.partial(backend.triton_kernels, "schedule")


def _gamma_nnet_cpu(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor) -> tuple[Tensor, Tensor]:
    t, w1, b1, w2, b2, w3 = (x.contiguous() for x in (t, w1, b1, w2, b2, w3))
    gamma, dgamma = torch.empty_like(t), torch.empty_like(t)
    args = [x.data_ptr() for x in (t, w1, b1, w2, b2, w3, gamma, dgamma)] + [t.shape[0], w2.shape[0], dtype_name(t.dtype)]
    # The CPU kernel reads t's range as it goes: the check costs nothing there, traced or not.
    _check_range(*_C.nnet_forward_cpu(*args))
    return gamma, dgamma


def _gamma_nnet_triton(t, w1, b1, w2, b2, w3):
    return _triton().nnet_forward(*(x.contiguous() for x in (t, w1, b1, w2, b2, w3)))


_gamma_nnet = kernel_op("gamma_nnet", "schedule", cpu=_gamma_nnet_cpu, triton=_gamma_nnet_triton)


@_gamma_nnet.register_fake
def _(t, w1, b1, w2, b2, w3):
    return torch.empty_like(t), torch.empty_like(t)


def _gamma_nnet_backward_cpu(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                             grad_gamma: Tensor, grad_dgamma: Tensor) -> list[Tensor]:
    inputs = [x.contiguous() for x in (t, w1, b1, w2, b2, w3, grad_gamma, grad_dgamma)]
    grads = [torch.empty_like(x) for x in inputs[:6]]
    _C.nnet_backward_cpu(*(x.data_ptr() for x in inputs + grads), t.shape[0], w2.shape[0], dtype_name(t.dtype))
    return grads


def _gamma_nnet_backward_triton(t, w1, b1, w2, b2, w3, grad_gamma, grad_dgamma):
    return list(_triton().nnet_backward(*(x.contiguous() for x in (t, w1, b1, w2, b2, w3, grad_gamma, grad_dgamma))))


_gamma_nnet_backward = kernel_op("gamma_nnet_backward", "schedule", cpu=_gamma_nnet_backward_cpu,
                                 triton=_gamma_nnet_backward_triton)


@_gamma_nnet_backward.register_fake
def _(t, w1, b1, w2, b2, w3, grad_gamma, grad_dgamma):
    return [torch.empty_like(x) for x in (t, w1, b1, w2, b2, w3)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_gamma, grad_dgamma):
    t = ctx.saved_tensors[0]
    # An output that did not reach the loss has no gradient: it contributes zero.
    grad_gamma = torch.zeros_like(t) if grad_gamma is None else grad_gamma
    grad_dgamma = torch.zeros_like(t) if grad_dgamma is None else grad_dgamma
    return tuple(_gamma_nnet_backward(*ctx.saved_tensors, grad_gamma, grad_dgamma))


_gamma_nnet.register_autograd(_backward, setup_context=_setup)


def _like_t(name: str, p, t: Tensor) -> None:
    """A parameter of the schedule: a floating tensor on ``t``'s device, of ``t``'s dtype."""
    validate.tensor(name, p, floating=True)
    validate.same_device(name, p, "t", t)
    if p.dtype != t.dtype:
        raise TypeError(f"{name} must have t's dtype {t.dtype}, got {p.dtype}")


def _check_params(t, w1, b1, w2, b2, w3) -> None:
    validate.tensor("t", t, floating=True)
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"t must be a non-empty 1-d tensor of times [B], got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"t must be float32 or float64, got {t.dtype}")
    for name, p in zip(PARAMS, (w1, b1, w2, b2, w3)):
        _like_t(name, p, t)
    layout = "torch Linear layout: w1 [1, 1], b1 [1], w2 [n, 1], b2 [n], w3 [1, n]"
    if w2.dim() != 2 or w2.shape[1] != 1 or w2.shape[0] < 1:
        raise ValueError(f"w2 must have shape (n, 1) with n >= 1 ({layout}), got {tuple(w2.shape)}")
    n = w2.shape[0]
    expected = {"w1": (1, 1), "b1": (1,), "b2": (n,), "w3": (1, n)}
    for name, p in zip(PARAMS, (w1, b1, w2, b2, w3)):
        if name in expected and tuple(p.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} ({layout}), got {tuple(p.shape)}")


def _check_range(lo: float, hi: float) -> None:
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
        raise ValueError(f"t must lie in [0, 1], got values in [{lo}, {hi}]")


def gamma_nnet(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor):
    """``(gamma(t), gamma'(t))`` of the official monotone network, fused.

    Parameters in torch ``Linear`` layout (``w1 [1, 1], b1 [1], w2 [n, 1], b2 [n], w3 [1, n]``),
    raw (the network uses their absolute values); ``t``: ``[B]`` in ``[0, 1]``, float32 or
    float64. Gradients flow to ``t`` and every parameter from either output.
    """
    _check_params(t, w1, b1, w2, b2, w3)
    impl = backend.implementation("schedule", t.device)
    # The C++ kernel checks t's range as it runs (``_gamma_nnet_cpu``); elsewhere it is read here.
    if impl != "cpp" and validate.values_readable(t):
        _check_range(*(v.item() for v in torch.aminmax(t.detach())))
    if impl == "reference":
        return ref.nnet(t, w1, b1, w2, b2, w3)
    return _gamma_nnet(t, w1, b1, w2, b2, w3)


def gamma_nnet_pinned(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                      gamma_0: Tensor, gamma_1: Tensor):
    """The endpoint-pinned schedule of the paper:
    ``gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0))`` with ``g`` the
    monotone network and learned scalar endpoints ``gamma_0``, ``gamma_1`` (shape ``[1]``).

    ``g`` runs once, fused, on ``[t, 0, 1]``; the normalisation is ``[B]``-sized arithmetic.
    """
    validate.tensor("t", t, floating=True)
    for name, p in (("gamma_0", gamma_0), ("gamma_1", gamma_1)):
        _like_t(name, p, t)
        if tuple(p.shape) != (1,):
            raise ValueError(f"{name} must have shape (1,), got {tuple(p.shape)}")
    if t.dim() != 1:
        raise ValueError(f"t must be a 1-d tensor of times [B], got shape {tuple(t.shape)}")
    B = t.shape[0]
    # The endpoints are made on t's device (new_tensor would copy them from the host, which a
    # CUDA graph cannot capture), and split off as views (tests/test_gpu_ready.py).
    g, dg = gamma_nnet(torch.cat([t, t.new_zeros(1), t.new_ones(1)]), w1, b1, w2, b2, w3)
    g_t, g_0, g_1 = g.split([B, 1, 1])
    scale = (gamma_1 - gamma_0) / (g_1 - g_0)
    # A network that is constant in t's dtype (w1 = 0 and w3 = 0, or a g(1) - g(0) below its
    # range) cannot be stretched between finite endpoints: the stretch, or its square in the
    # gradients, overflows. Refused by name where values may be read; inside a trace the 0 / 0
    # or overflow stays a NaN or inf.
    finite = torch.isfinite(torch.cat([g_0, g_1, gamma_0, gamma_1])).all()
    if validate.values_readable(t) and bool((finite & ~torch.isfinite(scale * scale).all()).item()):
        raise ValueError("gamma_nnet_pinned needs a network whose g(1) - g(0) is resolved in "
                         f"{t.dtype}, got g(0) = {g_0.item()}, g(1) = {g_1.item()} (w1 and w3 all zero, or "
                         "too small beside b1): a constant network's endpoints cannot be pinned")
    return gamma_0 + scale * (g_t - g_0), scale * dg.narrow(0, 0, B)


def variance_gradients(t: Tensor, params, grad_gamma: Tensor, grad_dgamma: Tensor, loss: Tensor,
                       endpoints: Optional[tuple] = None):
    """Variance minimisation (docs/design/math.md): the gradients of ``sum_i L_i^2`` with
    respect to the network's parameters ``params = (w1, b1, w2, b2, w3)``, that is
    ``sum_i 2 L_i dL_i/d eta``, from each example's ``dL_i / d gamma_t`` (``grad_gamma``) and
    ``dL_i / d gamma'_t`` (``grad_dgamma``) and its diffusion loss ``L_i`` (``loss``, no gradient
    flows through it). With ``endpoints = (gamma_0, gamma_1)`` the schedule is the pinned one.

    A trainer runs its ordinary VLB backward (which gives the endpoints their VLB gradient), then
    replaces the network parameters' gradients with these: one more fused forward and backward.
    ``t``, ``grad_gamma``, ``grad_dgamma`` and ``loss`` are ``[B]``.
    """
    validate.tensor("t", t, floating=True)
    B = validate.batch("t", t)
    for name, value in (("grad_gamma", grad_gamma), ("grad_dgamma", grad_dgamma), ("loss", loss)):
        validate.per_example(name, value, B, "t", t, broadcast=False)
    if not isinstance(params, (tuple, list)) or len(params) != len(PARAMS):
        raise TypeError(f"params must be the network's {len(PARAMS)} parameters {PARAMS}")
    if endpoints is not None and (not isinstance(endpoints, (tuple, list)) or len(endpoints) != 2):
        raise TypeError("endpoints must be a pair (gamma_0, gamma_1)")
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        if endpoints is None:
            gamma, dgamma = gamma_nnet(t.detach(), *leaves)
        else:
            gamma, dgamma = gamma_nnet_pinned(t.detach(), *leaves, *(e.detach() for e in endpoints))
        weight = 2.0 * loss.detach()
        surrogate = (weight * (grad_gamma.detach() * gamma + grad_dgamma.detach() * dgamma)).sum()
        return torch.autograd.grad(surrogate, leaves)
