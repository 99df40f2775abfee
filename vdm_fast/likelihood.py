"""The likelihood of a trained VDM through its probability-flow ODE (docs/guide/evaluation.md,
"The probability-flow ODE").

The forward process ``z_t = alpha_t x + sigma_t eps`` (``sigma^2 = sigmoid(gamma)``, ``alpha^2 =
sigmoid(-gamma)``) is the variance-preserving SDE ``dz = a(t) z dt + g(t) dW`` with ``a = d log
alpha / dt = -0.5 gamma' sigma^2`` and ``g^2 = d sigma^2 / dt - 2 a sigma^2 = gamma' sigma^2``. Its
probability-flow ODE ``dz/dt = a z - 0.5 g^2 score``, with the model's score ``-eps_hat / sigma``,
is::

    dz/dt = f(z, t) = -0.5 gamma'(t) sigma_t^2 (z - eps_hat(z, t) / sigma_t)

and the instantaneous change of variables gives the density of the model's ``z_0`` (the prior
``N(0, I)`` at ``t = 1`` carried back along the flow)::

    log p_ODE(z_0) = log N(z_1; 0, I) + int_0^1 div f(z_t, t) dt,
    div f = -0.5 gamma'(t) (D sigma_t^2 - sigma_t tr(d eps_hat / d z)).

With ``q(z_0 | x) = N(alpha_0 f, sigma_0^2 I)`` as the dequantisation and the model's own decoder
``p(x | z_0)``, Jensen's inequality bounds the discrete images' likelihood::

    -log p(x) <= E_{z_0 ~ q(z_0 | x)} [-log p(x | z_0) - log p_ODE(z_0) + log q(z_0 | x)].

``ode_log_density`` solves the ODE from 0 to 1 with torchdiffeq's adaptive solvers (the ``likelihood``
extra), the trace exact (``D`` vector-Jacobian products, batched) or by Hutchinson's estimator
(fixed probes for the whole solve, so the estimate of the integral is unbiased); ``ode_bound``
adds the decoder and the dequantisation. Both run the network in the model's dtype and the
solver's state in float64.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from vdm_fast import ops
from vdm_fast.extras import require
from vdm_fast.diffusion.pixels import bits_per_dim, encode
from vdm_fast.diffusion.process import alpha_sigma

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# torchdiffeq's adaptive-step solvers (the fixed-grid ones would need a step size and give no
# error control).
METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# The exact trace up to this many dimensions by default (the digits' 64; CIFAR-10's 3072 is not).
EXACT_MAX_DIMS = 256


def _odeint():
    """torchdiffeq's ``odeint``, or ``MissingExtra`` naming the ``likelihood`` extra."""
    require("likelihood", library=True)
    from torchdiffeq import odeint

    return odeint


def default_trace(dims: int) -> str:
    """``"exact"`` for at most ``EXACT_MAX_DIMS`` dimensions, else ``"hutchinson"``."""
    return "exact" if dims <= EXACT_MAX_DIMS else "hutchinson"


def draw_probes(generator: Optional[torch.Generator], count: int, shape, kind: str = "rademacher",
                dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` Hutchinson probes of ``shape`` (one image's) on the CPU: ``[count, *shape]``, each
    element +-1 (``rademacher``) or standard normal (``gaussian``); ``E[v v^T] = I`` either way."""
    if kind not in PROBES:
        raise ValueError(f"probe kind must be one of {PROBES}, got {kind!r}")
    if kind == "gaussian":
        return torch.randn((count, *shape), generator=generator, dtype=dtype)
    return torch.randint(0, 2, (count, *shape), generator=generator).to(dtype) * 2.0 - 1.0


class ODEDensity(NamedTuple):
    """``log_density [B]``: ``log p_ODE(z_0)`` in nats; ``z_1``: where the flow carried each
    ``z_0``; ``divergence [B]``: ``int_0^1 div f dt``; ``nfe``: evaluations of ``f`` by the
    solver (each one network call on the batch and, for the trace, its vector-Jacobian
    products: ``D`` of them for the exact trace, one per probe for Hutchinson's)."""

    log_density: Tensor
    z_1: Tensor
    divergence: Tensor
    nfe: int


class _Flow:
    """``(f, div f)`` of the probability-flow ODE for one batch, counting its evaluations."""

    def __init__(self, model, labels: Optional[Tensor], trace: str, probes: Optional[Tensor], max_batch: int):
        self.model, self.labels, self.trace, self.max_batch = model, labels, trace, max_batch
        self.probes = probes  # [K, B, D] in the model's dtype, or None
        self.nfe = 0

    def _eps_hat(self, z: Tensor, gamma: Tensor, labels: Optional[Tensor]) -> Tensor:
        return self.model.predict_eps(z, gamma, labels)

    def _vjps(self, z: Tensor, gamma: Tensor, cotangents: Tensor):
        """``eps_hat(z)`` and ``c_k^T d eps_hat / d z`` for each cotangent ``c_k`` (``[K, B, D]``):
        the batch is replicated ``K`` times (the network treats examples independently), in
        chunks of at most ``max_batch`` images a call."""
        B, K = z.shape[0], cotangents.shape[0]
        shape, dims = z.shape[1:], z[0].numel()
        per_call = max(1, self.max_batch // B)
        eps_hat, out = None, []
        for start in range(0, K, per_call):
            cot = cotangents[start:start + per_call]
            k = cot.shape[0]
            with torch.enable_grad():
                zr = z.detach().repeat(k, *[1] * len(shape)).requires_grad_(True)
                labels = None if self.labels is None else self.labels.repeat(k)
                e = self._eps_hat(zr, gamma.repeat(k), labels)
                (g,) = torch.autograd.grad(e, zr, cot.reshape(k * B, *shape).to(e.dtype))
            if eps_hat is None:
                eps_hat = e[:B].detach()
            out.append(g.reshape(k, B, dims))
        return eps_hat, torch.cat(out)

    def _trace(self, z: Tensor, gamma: Tensor):
        """``(eps_hat, tr(d eps_hat / d z))`` per example, exact or Hutchinson's estimate."""
        B, dims = z.shape[0], z[0].numel()
        if self.trace == "exact":
            basis = torch.eye(dims, dtype=z.dtype, device=z.device)[:, None, :].expand(dims, B, dims)
            eps_hat, rows = self._vjps(z, gamma, basis)  # rows[j, b] = e_j^T J_b
            return eps_hat, torch.diagonal(rows, dim1=0, dim2=2).sum(dim=-1).to(torch.float64)
        eps_hat, vjps = self._vjps(z, gamma, self.probes)  # [K, B, D]
        return eps_hat, (vjps.double() * self.probes.double()).sum(dim=-1).mean(dim=0)

    def __call__(self, t: Tensor, state):
        z, _ = state
        self.nfe += 1
        model = self.model
        B, dims = z.shape[0], z[0].numel()
        dtype = model.dtype
        # The solver's first-step guess may look past t = 1; the schedule is defined on [0, 1].
        t = t.reshape(1).clamp(0.0, 1.0).to(dtype)
        with torch.no_grad():
            gamma, dgamma = model.gamma(t)
        gamma, dgamma = gamma.detach().double(), dgamma.detach().double()
        sigma2 = torch.sigmoid(gamma)
        sigma = torch.sqrt(sigma2)
        eps_hat, trace = self._trace(z.to(dtype), gamma.to(dtype).expand(B))
        f = -0.5 * dgamma * (sigma2 * z - sigma * eps_hat.double())
        div = -0.5 * dgamma * (dims * sigma2 - sigma * trace)
        return f, div


@torch.no_grad()
def ode_log_density(model, z_0: Tensor, labels: Optional[Tensor] = None, *, trace: Optional[str] = None,
                    probes: Optional[Tensor] = None, rtol: float = 1e-5, atol: float = 1e-5,
                    method: str = "dopri5", max_batch: int = 2048) -> ODEDensity:
    """``log p_ODE(z_0)`` of each latent of ``z_0 [B, C, H, W]`` under ``model`` (a ``VDM``, in
    eval mode), by solving its probability-flow ODE from ``t = 0`` to ``1`` (module docstring).

    ``labels [B]``: a conditional model's classes (``num_classes``: none). ``trace``: ``"exact"``
    or ``"hutchinson"`` (default: exact for ``D <= 256``). ``probes [K, B, C, H, W]``: Hutchinson's
    probes (``draw_probes``), fixed for the whole solve; required for ``"hutchinson"``.
    ``rtol``, ``atol``, ``method``: torchdiffeq's adaptive solver. ``max_batch``: images per
    network call of the vector-Jacobian products (the batch is replicated ``D`` or ``K`` times).
    The step-size control sees the whole batch, so a latent's result depends on its batch
    companions within the tolerance: batch by a fixed rule where results must repeat."""
    odeint = _odeint()
    if z_0.dim() != 4 or tuple(z_0.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"z_0 must be [B, {', '.join(map(str, model.image_shape))}], got {tuple(z_0.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of torchdiffeq's adaptive solvers {METHODS}, got {method!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    B, dims = z_0.shape[0], z_0[0].numel()
    trace = default_trace(dims) if trace is None else trace
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if trace == "hutchinson":
        if probes is None or probes.dim() != 5 or tuple(probes.shape[1:]) != tuple(z_0.shape):
            raise ValueError(f"Hutchinson's trace needs probes [K, {', '.join(map(str, z_0.shape))}]")
        probes = probes.to(z_0.device, model.dtype).reshape(probes.shape[0], B, dims)
    if model.num_classes and (labels is None or labels.shape != (B,)):
        raise ValueError(f"a class-conditional model needs labels of shape ({B},)")
    if not model.num_classes and labels is not None:
        raise ValueError("labels given to an unconditional model (num_classes = 0)")
    labels = None if labels is None else labels.to(z_0.device)
    flow = _Flow(model, labels, trace, probes if trace == "hutchinson" else None, max_batch)
    y0 = (z_0.detach().double(), torch.zeros(B, dtype=torch.float64, device=z_0.device))
    times = torch.tensor([0.0, 1.0], dtype=torch.float64, device=z_0.device)
    zs, divs = odeint(flow, y0, times, rtol=rtol, atol=atol, method=method)
    z_1, divergence = zs[-1], divs[-1]
    prior = -0.5 * z_1.reshape(B, -1).pow(2).sum(dim=1) - 0.5 * dims * math.log(2 * math.pi)
    return ODEDensity(prior + divergence, z_1, divergence, flow.nfe)


class ODEBound(NamedTuple):
    """Per image ``[B]``, in nats unless said: the bound ``-log p(x | z_0) - log p_ODE(z_0) + log
    q(z_0 | x)`` (``nats``) and its parts, the bound in bits per dim (``bpd``), and the solver's
    number of evaluations (``nfe``)."""

    nats: Tensor
    reconstruction: Tensor
    log_q: Tensor
    log_p_ode: Tensor
    bpd: Tensor
    nfe: int


@torch.no_grad()
def ode_bound(model, x: Tensor, eps_0: Tensor, labels: Optional[Tensor] = None, **solver) -> ODEBound:
    """One draw of the variational-dequantisation bound on ``-log p(x)`` of integer images ``x
    [B, C, H, W]``: ``z_0 = alpha_0 f + sigma_0 eps_0`` (``q(z_0 | x)``), the model's decoder
    there (the bound's reconstruction term, ``vdm_fast.ops.reconstruction_loss``), and ``log
    p_ODE(z_0)`` from ``ode_log_density`` (``solver``: its keyword arguments)."""
    B, dims = x.shape[0], x[0].numel()
    dtype = model.dtype
    f = encode(x, model.vocab_size, dtype)
    eps_0 = eps_0.to(x.device, dtype)
    gamma_0, _ = model.gamma(torch.zeros(1, device=x.device, dtype=dtype))
    gamma_0 = gamma_0.detach()
    alpha_0, sigma_0 = alpha_sigma(gamma_0)
    z_0 = alpha_0 * f + sigma_0 * eps_0
    reconstruction = ops.reconstruction_loss(x, eps_0, gamma_0.reshape(()), model.vocab_size).double()
    # log q(z_0 | x) = log N(z_0; alpha_0 f, sigma_0^2 I), with log sigma_0^2 = log sigmoid(gamma_0)
    log_sigma2 = torch.nn.functional.logsigmoid(gamma_0.double())
    log_q = (-0.5 * eps_0.double().reshape(B, -1).pow(2).sum(dim=1)
             - 0.5 * dims * (math.log(2 * math.pi) + log_sigma2))
    density = ode_log_density(model, z_0, labels, **solver)
    nats = reconstruction + log_q - density.log_density
    return ODEBound(nats, reconstruction, log_q, density.log_density, bits_per_dim(nats, dims), density.nfe)


__all__ = ["EXACT_MAX_DIMS", "METHODS", "PROBES", "TRACES", "ODEBound", "ODEDensity",
           "default_trace", "draw_probes", "ode_bound", "ode_log_density"]
