"""Samplers of a VDM: ancestral, DDIM, DPM-Solver++(2M) and its SDE form, on the model's own schedule.

Every sampler starts from ``z_1 ~ N(0, I)``, walks a grid of times from ``t = 1`` down to
``t = 0`` calling the network once per step (twice under classifier-free guidance, through
``VDM.predict_eps``), and ends by decoding ``z_0`` with the model's decoder, as ``VDM.sample``
always has. In the VDM's notation (``sigma^2 = sigmoid(gamma)``, ``alpha^2 = sigmoid(-gamma)``,
log-SNR ``lambda = -gamma``), from ``z_t`` to ``z_s``, ``s < t``, with the noise prediction
``eps`` and the data prediction ``x = (z_t - sigma_t eps) / alpha_t``:

============ ==============================================================================
sampler      step
============ ==============================================================================
ancestral    ``z_s ~ q(z_s | z_t, x)``: the chain the discrete-time bound is written for
             (``vdm_fast.diffusion.sampling.ancestral_step``)
ddim         ``z_s = alpha_s x + sqrt(sigma_s^2 - v) eps + sqrt(v) noise``,
             ``v = eta^2 sigma_s^2 (1 - SNR_t / SNR_s)`` (Song et al. 2021): ``eta = 1`` is the
             ancestral step (the same noises give the same chain), ``eta = 0`` the
             deterministic first-order solver of the probability-flow ODE
dpm-solver   DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the data-prediction form, second
             order, multistep (one network call per step; the first step is first order),
             ``z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D``, ``h`` the step in
             ``log(alpha / sigma) = lambda / 2``, ``D`` the extrapolated data prediction
             ``(1 + 1/2r) x - (1/2r) x_prev``, ``r = h_prev / h``
dpm-solver-  SDE-DPM-Solver++(2M) (the same paper, its stochastic form): ``z_s = (sigma_s /
sde          sigma_t) e^-h z_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) noise``; with
             ``D = x`` (its first step) this is the ancestral step exactly, so it is the
             ancestral sampler with the multistep second-order data prediction
============ ==============================================================================

The deterministic samplers (ddim with ``eta = 0``, dpm-solver) solve the probability-flow ODE,
whose samples are only as good as the model's score is exact; the stochastic ones (ancestral,
ddim with ``eta > 0``, dpm-solver-sde) inject fresh noise each step, which also corrects part
of the model's error (``benchmarks/bench_samplers.py`` measures both on digits).

Time grids (``spacing``): ``"time"``, uniform in ``t`` (``1, 1 - 1/N, ..., 0``: the ancestral
sampler's, today's ``VDM.sample``), or ``"lambda"``, uniform in log-SNR between ``lambda(1)``
and ``lambda(0)`` of the model's schedule, at the times ``t(lambda)`` found by inverting the
schedule numerically (``invert_schedule``: a dense grid and vectorised bisection, exact to the
working precision for any increasing schedule, learned or not). The defaults: ``"time"`` for
ancestral and ddim, ``"lambda"`` for the two dpm-solvers, as each paper has it.

``sample`` is the whole of it (``VDM.sample(..., sampler=...)`` calls it); ``denoise`` maps a
given ``z_1`` to ``z_0`` and ``decode`` turns ``z_0`` into integer images, for a caller that
brings its own noise or its own loop (``vdm_fast.integrations.diffusers_scheduler``).
"""

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from vdm_fast import validate
from vdm_fast.diffusion.pixels import decode as _decode
from vdm_fast.diffusion.process import alpha_sigma, per_example
from vdm_fast.diffusion.sampling import ancestral_step

SAMPLERS = ("ancestral", "ddim", "dpm-solver", "dpm-solver-sde")
STOCHASTIC = ("ancestral", "dpm-solver-sde")  # and ddim with eta > 0
SPACINGS = ("time", "lambda")
DEFAULT_SPACING = {"ancestral": "time", "ddim": "time", "dpm-solver": "lambda", "dpm-solver-sde": "lambda"}


def check_sampler(sampler: str, eta: Optional[float] = None, spacing: Optional[str] = None) -> Tuple[float, str]:
    """``(eta, spacing)`` resolved for ``sampler`` (``eta``: 0 for ddim unless given; the
    sampler's default spacing unless given), or a ``ValueError`` naming what is wrong."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if eta is not None:
        validate.finite_number("eta", eta)
        if sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only (ancestral is ddim with eta = 1), got eta={eta} "
                             f"with sampler={sampler!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic, 1: ancestral), got {eta}")
    spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return (0.0 if eta is None else float(eta)), spacing


def network_evaluations(steps: int, guided: bool = False) -> int:
    """Calls of the score network a sampler makes for ``steps`` steps: one per step for every
    sampler here (DPM-Solver++(2M) reuses the previous step's prediction), two under
    classifier-free guidance (the conditional and the unconditional prediction)."""
    return steps * (2 if guided else 1)


# --- t(lambda): the schedule inverted ----------------------------------------------------------

def _gamma_of(schedule: Callable) -> Callable[[Tensor], Tensor]:
    """``t -> gamma(t)`` of a schedule (a vdm_fast schedule or ``VDM.gamma``, which return
    ``(gamma, gamma')``, or any callable returning ``gamma``), detached."""
    def gamma(t: Tensor) -> Tensor:
        out = schedule(t)
        if isinstance(out, tuple):
            out = out[0]
        return out.detach()
    return gamma


@torch.no_grad()
def invert_schedule(schedule: Callable, gamma: Tensor, grid: int = 1024) -> Tensor:
    """The times ``t`` in ``[0, 1]`` with ``schedule(t) = gamma`` (any shape of ``gamma``), for an
    increasing schedule: ``VDM.gamma``, a vdm_fast schedule module or any callable
    ``t [K] -> gamma [K]`` (or ``(gamma, gamma')``), evaluated in ``gamma``'s dtype and device.

    The schedule is evaluated on ``grid + 1`` evenly spaced times, each target is bracketed by
    ``searchsorted``, and all brackets are halved together (one schedule call per halving) until
    they are a few units in the last place wide; the last bracket is interpolated linearly. The
    fixed and learned-scalar schedules are linear (``t = (gamma - gamma(0)) / (gamma(1) -
    gamma(0))``) and come out exact through the same path. Targets outside
    ``[gamma(0), gamma(1)]`` beyond rounding, and a schedule that decreases anywhere on the grid,
    are refused with a ``ValueError``.
    """
    if not isinstance(gamma, Tensor) or not gamma.is_floating_point():
        raise TypeError(f"gamma must be a floating-point tensor, got {type(gamma).__name__}")
    fn = _gamma_of(schedule)
    shape, targets = gamma.shape, gamma.detach().reshape(-1)
    dtype, device = targets.dtype, targets.device
    ts = torch.linspace(0.0, 1.0, grid + 1, dtype=dtype, device=device)
    gs = fn(ts).to(dtype)
    if not torch.isfinite(gs).all():
        raise ValueError("the schedule is not finite on [0, 1]")
    if (gs[1:] < gs[:-1]).any():
        raise ValueError("the schedule must be increasing in t to be inverted (it decreases somewhere on [0, 1])")
    slack = 64 * torch.finfo(dtype).eps * gs.abs().max()
    if (targets < gs[0] - slack).any() or (targets > gs[-1] + slack).any() or not torch.isfinite(targets).all():
        raise ValueError(f"gamma must lie in [gamma(0), gamma(1)] = [{gs[0].item():.6g}, {gs[-1].item():.6g}]")
    targets = targets.clamp(gs[0], gs[-1])
    hi_index = torch.searchsorted(gs, targets).clamp(1, grid)  # gs[i - 1] < target <= gs[i]
    lo, hi = ts[hi_index - 1], ts[hi_index]
    # Halve every bracket together until it is ~4 ulp of 1 wide: grid * 2^-k = 4 eps.
    halvings = max(0, math.ceil(math.log2(1.0 / (grid * 4 * torch.finfo(dtype).eps))))
    for _ in range(halvings):
        mid = 0.5 * (lo + hi)
        below = fn(mid).to(dtype) < targets
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    g_lo, g_hi = fn(lo).to(dtype), fn(hi).to(dtype)
    width = g_hi - g_lo
    w = torch.where(width > 0, (targets - g_lo) / torch.where(width > 0, width, torch.ones_like(width)),
                    torch.zeros_like(width)).clamp(0.0, 1.0)
    return (lo + w * (hi - lo)).reshape(shape)


def time_grid(model, steps: int, spacing: str = "time", device=None, dtype=None) -> Tuple[Tensor, Tensor]:
    """The ``steps + 1`` times ``t`` from 1 down to 0 (exactly) that a sampler visits, and the
    schedule's ``gamma`` there (``model.gamma``), both ``[steps + 1]``.

    ``"time"``: ``t_i = (steps - i) / steps``, computed as ``VDM.sample`` always has.
    ``"lambda"``: ``gamma_i`` evenly spaced from ``gamma(1)`` to ``gamma(0)`` (log-SNR
    ``lambda = -gamma`` uniform), ``t_i = invert_schedule(gamma_i)``; the gammas returned are the
    schedule's at those times (equal to the even ones to the working precision). ``model``: a
    ``VDM``, or anything with ``dtype`` and ``gamma(t)`` (returning ``gamma`` or ``(gamma,
    gamma')``)."""
    validate.finite_number("steps", steps, positive=True, integer=True)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    dtype = model.dtype if dtype is None else dtype
    gamma = _gamma_of(model.gamma)
    if spacing == "time":
        t = torch.arange(steps, -1, -1, device=device, dtype=dtype) / steps  # 1, ..., 1/T, 0
    else:
        ends = gamma(torch.tensor([1.0, 0.0], device=device, dtype=dtype))
        frac = torch.arange(steps + 1, device=device, dtype=dtype) / steps
        targets = ends[0] + (ends[1] - ends[0]) * frac
        t = invert_schedule(gamma, targets)
        t[0], t[-1] = 1.0, 0.0
    return t, gamma(t)


# --- the steps ----------------------------------------------------------------------------------

def ddim_step(z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor, eta: float,
              noise: Optional[Tensor] = None) -> Tensor:
    """One DDIM step ``z_t -> z_s`` (``gamma`` per example ``[B]``): ``alpha_s x_hat +
    sqrt(sigma_s^2 - v) eps_hat + sqrt(v) noise``, ``v = eta^2 sigma_s^2 (1 - SNR_t / SNR_s)``
    (``noise`` is needed when ``eta > 0``). ``eta = 1`` is ``ancestral_step`` rearranged."""
    g_t, g_s = per_example(gamma_t, z_t), per_example(gamma_s, z_t)
    eps_hat = eps_hat.to(z_t.dtype)
    alpha_t, sigma_t = alpha_sigma(g_t)
    alpha_s, sigma_s = alpha_sigma(g_s)
    x_hat = (z_t - sigma_t * eps_hat) / alpha_t
    if eta == 0.0:
        return alpha_s * x_hat + sigma_s * eps_hat
    share = (eta * eta) * -torch.expm1(g_s - g_t)  # v / sigma_s^2, in [0, 1]
    return alpha_s * x_hat + sigma_s * (torch.sqrt(1.0 - share) * eps_hat + torch.sqrt(share) * noise)


def dpm_solver_step(z_t: Tensor, x_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor,
                    x_prev: Optional[Tensor] = None, h_prev: Optional[Tensor] = None) -> Tensor:
    """One DPM-Solver++(2M) step ``z_t -> z_s`` from the data prediction ``x_hat`` at ``t``
    (``gamma`` per example ``[B]``); with the previous step's data prediction ``x_prev`` and its
    step ``h_prev`` (in ``log(alpha / sigma)``) the second-order multistep update, without them
    the first-order one (DPM-Solver++(1), which is DDIM with ``eta = 0``)."""
    g_t, g_s = per_example(gamma_t, z_t), per_example(gamma_s, z_t)
    _, sigma_t = alpha_sigma(g_t)
    alpha_s, sigma_s = alpha_sigma(g_s)
    h = 0.5 * (g_t - g_s)  # lambda_s - lambda_t, lambda = log(alpha / sigma) = -gamma / 2
    d = x_hat
    if x_prev is not None:
        r = per_example(h_prev, z_t) / h
        d = x_hat + (x_hat - x_prev) / (2.0 * r)  # (1 + 1/2r) x_hat - (1/2r) x_prev
    return (sigma_s / sigma_t) * z_t - alpha_s * torch.expm1(-h) * d


def sde_dpm_solver_step(z_t: Tensor, x_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor, noise: Tensor,
                        x_prev: Optional[Tensor] = None, h_prev: Optional[Tensor] = None) -> Tensor:
    """One SDE-DPM-Solver++(2M) step ``z_t -> z_s``: ``(sigma_s / sigma_t) e^-h z_t + alpha_s
    (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) noise`` (``1 - e^-2h = 1 - SNR_s^-1 SNR_t``, the
    ancestral step's ``c``), ``D`` as in ``dpm_solver_step``; without ``x_prev`` (``D = x_hat``)
    it is ``ancestral_step``."""
    g_t, g_s = per_example(gamma_t, z_t), per_example(gamma_s, z_t)
    _, sigma_t = alpha_sigma(g_t)
    alpha_s, sigma_s = alpha_sigma(g_s)
    h = 0.5 * (g_t - g_s)
    c = -torch.expm1(g_s - g_t)  # 1 - e^-2h
    d = x_hat
    if x_prev is not None:
        d = x_hat + (x_hat - x_prev) / (2.0 * (per_example(h_prev, z_t) / h))
    return (sigma_s / sigma_t) * torch.exp(-h) * z_t + alpha_s * c * d + sigma_s * torch.sqrt(c) * noise


# --- the samplers -------------------------------------------------------------------------------

def _check_labels(model, n: int, labels: Optional[Tensor]) -> None:
    if model.num_classes and (labels is None or labels.shape != (n,)):
        raise ValueError(f"a class-conditional model samples with labels of shape ({n},)")
    if not model.num_classes and labels is not None:
        raise ValueError("labels given to an unconditional model (num_classes = 0)")


@torch.no_grad()
def denoise(model, z: Tensor, steps: int, sampler: str = "ancestral", *, eta: Optional[float] = None,
            spacing: Optional[str] = None, labels: Optional[Tensor] = None, guidance: float = 0.0,
            generator: Optional[torch.Generator] = None) -> Tensor:
    """``z_0`` from ``z = z_1 [n, C, H, W]`` by ``sampler`` with ``steps`` steps (see the module).

    The stochastic samplers (ancestral, dpm-solver-sde; ddim with ``eta > 0``) draw one standard normal of
    ``z``'s shape per step from ``generator``, in step order. ``labels [n]`` and ``guidance``
    as in ``VDM.sample``."""
    return _denoise(model, z, steps, sampler, eta, spacing, labels, guidance, generator)[0]


def _denoise(model, z, steps, sampler, eta, spacing, labels, guidance, generator):
    """``(z_0, gamma_0)``: ``denoise``, and the grid's ``gamma(0)`` that ``decode`` takes."""
    eta, spacing = check_sampler(sampler, eta, spacing)
    validate.finite_number("steps", steps, positive=True, integer=True)
    validate.finite_number("guidance", guidance)
    n, device = z.shape[0], z.device
    _check_labels(model, n, labels)
    _, gammas = time_grid(model, steps, spacing, device=device, dtype=z.dtype)
    labels = None if labels is None else labels.to(device)
    x_prev = h_prev = None
    for i in range(steps):
        gamma_t, gamma_s = gammas[i].expand(n), gammas[i + 1].expand(n)
        eps_hat = model.predict_eps(z, gamma_t, labels, guidance)
        if sampler == "ancestral":
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
            z = ancestral_step(z, eps_hat, gamma_t, gamma_s, noise)
        elif sampler == "ddim":
            noise = (torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype) if eta > 0 else None)
            z = ddim_step(z, eps_hat, gamma_t, gamma_s, eta, noise)
        else:
            alpha_t, sigma_t = alpha_sigma(per_example(gamma_t, z))
            x_hat = (z - sigma_t * eps_hat.to(z.dtype)) / alpha_t
            if sampler == "dpm-solver":
                z = dpm_solver_step(z, x_hat, gamma_t, gamma_s, x_prev, h_prev)
            else:
                noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
                z = sde_dpm_solver_step(z, x_hat, gamma_t, gamma_s, noise, x_prev, h_prev)
            x_prev, h_prev = x_hat, 0.5 * (gamma_t - gamma_s)
    return z, gammas[steps].expand(n)


@torch.no_grad()
def decode(model, z_0: Tensor, sample_x: bool = False, generator: Optional[torch.Generator] = None,
           gamma_0: Optional[Tensor] = None) -> Tensor:
    """Integer images (int64 ``[n, C, H, W]`` in ``[0, vocab_size)``) from ``z_0``: the model's
    decoder ``p(x | z_0)`` at ``gamma(0)`` (``model.gamma`` at ``t = 0`` unless ``gamma_0 [n]``
    is given), its argmax (or a sample, ``sample_x=True``)."""
    n = z_0.shape[0]
    if gamma_0 is None:
        gamma_0 = model.gamma(torch.zeros(1, device=z_0.device, dtype=z_0.dtype))[0].detach().expand(n)
    alpha_0, _ = alpha_sigma(gamma_0)
    return _decode(z_0 / alpha_0[:, None, None, None], gamma_0, model.vocab_size, sample_x, generator)


@torch.no_grad()
def sample(model, n: int, steps: int, sampler: str = "ancestral", *, eta: Optional[float] = None,
           spacing: Optional[str] = None, generator: Optional[torch.Generator] = None, device=None,
           sample_x: bool = False, labels: Optional[Tensor] = None, guidance: float = 0.0) -> Tensor:
    """``n`` images (int64 ``[n, C, H, W]``) of ``model`` (a ``VDM``) by ``sampler`` with
    ``steps`` steps (``network_evaluations(steps, guided)`` network calls) from ``z_1 ~ N(0, I)``
    drawn from ``generator``, decoded at ``z_0`` by argmax (or sampled, ``sample_x=True``).

    ``sampler``: ``"ancestral"`` (``VDM.sample``'s chain, the same images for the same
    generator), ``"ddim"`` (``eta`` in [0, 1], default 0), ``"dpm-solver"``
    (DPM-Solver++(2M)) or ``"dpm-solver-sde"`` (SDE-DPM-Solver++(2M)); ``spacing``: ``"time"`` or ``"lambda"`` (the sampler's default: see
    the module). A conditional model takes ``labels [n]`` (``num_classes``: unconditional) and a
    classifier-free ``guidance`` scale w >= 0 (0: the plain conditional model)."""
    validate.finite_number("n", n, positive=True, integer=True)
    validate.finite_number("steps", steps, positive=True, integer=True)
    validate.finite_number("guidance", guidance)
    check_sampler(sampler, eta, spacing)
    _check_labels(model, n, labels)
    device = device if device is not None else next(model.parameters()).device
    z = torch.randn((n, *model.image_shape), generator=generator, device=device, dtype=model.dtype)
    z, gamma_0 = _denoise(model, z, steps, sampler, eta, spacing, labels, guidance, generator)
    return decode(model, z, sample_x, generator, gamma_0=gamma_0)


__all__ = ["SAMPLERS", "STOCHASTIC", "SPACINGS", "check_sampler", "network_evaluations", "invert_schedule", "time_grid",
           "ddim_step", "dpm_solver_step", "sde_dpm_solver_step", "denoise", "decode", "sample"]
