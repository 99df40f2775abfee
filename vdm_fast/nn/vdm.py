"""The VDM model: a noise schedule and a score network, trained on the variational bound (or
a weighted objective), optionally class-conditional with classifier-free guidance."""

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from vdm_fast import ops, validate
from vdm_fast.diffusion.pixels import bits_per_dim, encode
from vdm_fast.diffusion.parameterization import check_prediction, to_eps
from vdm_fast.diffusion import draws
from vdm_fast.diffusion.times import discretize_time
from vdm_fast.diffusion.weighting import WEIGHTINGS, diffusion_weight
from vdm_fast.nn.schedule import FixedLinearSchedule, gamma_and_derivative

SCHEDULE_OBJECTIVES = ("elbo", "variance")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies each example's gradient by ``scale[i]``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.reshape(-1, *[1] * (grad.dim() - 1)).to(grad.dtype), None


def _scale_grad(x: Tensor, scale: Tensor) -> Tensor:
    return _ScaleGrad.apply(x, scale.detach())


class VDMOutput(NamedTuple):
    """What one forward gives, each ``[B]`` (one value per example).

    The bound: its three terms in nats and its total in bits per dim. Then what the explicit
    objectives (``VDM.objective``, ``VDM.variance_gradients``) need: the times ``t`` the terms
    were taken at (on the grid ``i / T`` when ``T > 0``), the schedule's ``gamma_t`` and
    ``dgamma_dt`` there (in the graph: their gradients after a backward are the schedule's share
    of it), and ``weight``, the weighting's factor on the diffusion term (detached; ones under
    ``"elbo"``).
    """

    reconstruction: Tensor
    prior: Tensor
    diffusion: Tensor
    bpd: Tensor
    t: Tensor
    gamma_t: Tensor
    dgamma_dt: Tensor
    weight: Tensor


class VDM(nn.Module):
    """A Variational Diffusion Model over integer images ``[B, C, H, W]`` in ``[0, vocab_size)``.

    Args:
        score_net: ``pred = score_net(z_t, gamma_t[, labels])`` returning a tensor of ``z_t``'s
            shape, e.g. ``vdm_fast.nn.ScoreUNet``; wrap a ``diffusers`` or lucidrains U-Net with
            ``vdm_fast.integrations.adapters.from_diffusers`` / ``from_denoising_diffusion_pytorch``.
        schedule: ``(gamma, gamma') = schedule(t)``, e.g. ``vdm_fast.nn.LearnedScalarSchedule``,
            or any differentiable callable ``gamma = schedule(t)`` (another library's schedule,
            e.g. ``lambda t: -log_snr(t)``): its derivative is then taken by autograd
            (``vdm_fast.nn.gamma_and_derivative``).
        image_shape: ``(C, H, W)`` of the data, used by ``sample``.
        vocab_size: number of intensity levels (256 for 8-bit images).
        antithetic: draw training times as ``(u + i / B) mod 1`` (lower variance).
        prediction: what the network predicts: ``"eps"``, ``"x"``, ``"v"`` or ``"score"``.
        weighting: the training objective over log-SNR (Kingma and Gao 2023): ``"elbo"``
            (w = 1), ``"sigmoid"`` (w = sigmoid(sigmoid_bias - lambda)) or ``"eps_mse"``
            (the "simple" loss). The bound (``bpd``) stays the evaluation metric.
            The weighting trains the score network only: the schedule's gradient is always the
            bound's (see ``forward``), so a weighted objective cannot fit the schedule to itself.
            ``objective(out)`` is the loss to train on.
        num_classes: the classes of a class-conditional model (0: unconditional; the score net
            must take labels); ``label_dropout`` of the training labels are replaced by the null class
            ``num_classes``, so one network learns both p(x | c) and p(x).
        schedule_objective: ``"elbo"`` (the schedule descends the bound) or ``"variance"``:
            the paper's variance minimisation for an endpoint-pinned ``MonotoneNetSchedule``
            (continuous time): after ``backward``, ``variance_gradients(out, ...)`` gives the
            schedule network's gradients of the mean squared diffusion loss, to use in place of
            the bound's, while its endpoints keep the bound's gradient.
        autocast_dtype: run the score network (only) under ``torch.autocast`` in this dtype
            (e.g. ``torch.bfloat16``); the schedule and the loss stay in the model's dtype.
    """

    def __init__(self, score_net: nn.Module, schedule: nn.Module, image_shape: Sequence[int],
                 vocab_size: int = 256, antithetic: bool = True, prediction: str = "eps",
                 weighting: str = "elbo", sigmoid_bias: float = 0.0, num_classes: int = 0,
                 label_dropout: float = 0.1, schedule_objective: str = "elbo",
                 autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        validate.finite_number("vocab_size", vocab_size, positive=True, integer=True)
        check_prediction(prediction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if schedule_objective not in SCHEDULE_OBJECTIVES:
            raise ValueError(f"schedule_objective must be one of {SCHEDULE_OBJECTIVES}, got {schedule_objective!r}")
        if schedule_objective == "variance" and not getattr(schedule, "pinned", False):
            raise ValueError("schedule_objective='variance' needs MonotoneNetSchedule(pinned=True): the endpoints "
                             "descend the bound, the network between them the variance")
        self.score_net, self.schedule = score_net, schedule
        self.schedule_objective, self.autocast_dtype = schedule_objective, autocast_dtype
        self.image_shape = tuple(int(s) for s in image_shape)
        self.vocab_size, self.antithetic = vocab_size, antithetic
        self.prediction, self.weighting, self.sigmoid_bias = prediction, weighting, float(sigmoid_bias)
        self.num_classes, self.label_dropout = int(num_classes), float(label_dropout)

    def gamma(self, t: Tensor):
        """``(gamma(t), gamma'(t))`` of the schedule."""
        if isinstance(self.schedule, FixedLinearSchedule):  # vdm_fast's schedules return both
            return self.schedule(t)
        return gamma_and_derivative(self.schedule, t)

    def _net(self, z: Tensor, gamma: Tensor, labels: Optional[Tensor],
             conditioning: Optional[Tensor] = None) -> Tensor:
        args = (z, gamma) if self.num_classes == 0 else (z, gamma, labels)
        kwargs = {} if conditioning is None else {"conditioning": conditioning}  # ScoreUNet's own input
        if self.autocast_dtype is None:
            return self.score_net(*args, **kwargs)
        with torch.autocast(z.device.type, dtype=self.autocast_dtype):
            return self.score_net(*args, **kwargs)

    def _labels(self, labels: Optional[Tensor], B: int, device, generator,
                drop: Optional[Tensor] = None) -> Optional[Tensor]:
        """Training labels with ``label_dropout`` of them (or those where ``drop``) replaced by
        the null class."""
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("labels given to an unconditional model (num_classes = 0)")
            return None
        if labels is None or labels.shape != (B,):
            raise ValueError(f"a class-conditional model needs labels of shape ({B},)")
        # Values are read in eager mode only (a host sync; a traced or captured step skips it).
        if validate.values_readable(labels) and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes}: no class)")
        labels = labels.to(device)
        if self.training and self.label_dropout > 0:
            if drop is None:
                drop = torch.rand(B, generator=generator, device=device) < self.label_dropout
            elif drop.shape != (B,) or drop.dtype != torch.bool:
                raise ValueError(f"drop_labels must be a bool tensor of shape ({B},), got {drop.dtype} {tuple(drop.shape)}")
            labels = torch.where(drop.to(device), torch.full_like(labels, self.num_classes), labels)
        return labels

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters: data, noise and times are drawn in it."""
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def _noise(self, given: Optional[Tensor], like: Tensor, generator) -> Tensor:
        if given is None:
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return given.to(like.device, like.dtype)

    @property
    def _dims(self) -> int:
        return math.prod(self.image_shape)

    def forward(self, x: Tensor, T: int = 0, generator: Optional[torch.Generator] = None, *,
                t: Optional[Tensor] = None, eps: Optional[Tensor] = None,
                eps_0: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                drop_labels: Optional[Tensor] = None, conditioning: Optional[Tensor] = None) -> VDMOutput:
        """One Monte-Carlo estimate of the bound's terms for each image of ``x`` (``VDMOutput``).

        ``T = 0``: continuous-time diffusion loss; ``T > 0``: the T-step discrete-time loss.
        The times ``t [B]`` and noises ``eps``, ``eps_0`` (shape of ``x``) are drawn from
        ``generator`` unless given (a data-parallel trainer slices them from a global draw).
        ``labels``: class indices ``[B]`` of a conditional model (``num_classes`` = none);
        ``drop_labels``: bool ``[B]``, which of them training replaces by the null class (drawn
        with probability ``label_dropout`` unless given). ``conditioning``: the scalar input
        ``[B]`` of ``ScoreUNet`` (the official one's; default 0), passed to the network as given.

        Nothing is kept on the module. A training step::

            out = model(x)
            model.objective(out).mean().backward()

        and under ``schedule_objective="variance"``, after that backward,
        ``model.variance_step_(out)`` (which sets the schedule network's gradients).

        Under a weighting other than ``"elbo"`` the graph is built so that the bound's gradient
        trains the score network on the weighted loss and the schedule on the bound (below).
        """
        validate.finite_number("T", T, integer=True)
        if T < 0:
            raise ValueError(f"T must be >= 0 (0: continuous time), got {T}")
        if self.schedule_objective == "variance" and T:
            raise ValueError("schedule_objective='variance' is defined for the continuous-time loss (T = 0)")
        validate.image_tensor("x", x)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be [B, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        B, device, dtype = x.shape[0], x.device, self.dtype
        f = encode(x, self.vocab_size, dtype)

        # Times (on the T-step grid: t and s = t - 1/T) and one schedule call for every time the
        # bound needs: t (and s), 0 and 1.
        t = draws.times(B, self.antithetic, generator, device, dtype) if t is None else t.to(device, dtype)
        s = None
        if T > 0:
            t, s = discretize_time(t, T)
        times = [t, s] if T else [t]
        gamma, dgamma = self.gamma(torch.cat([*times, t.new_zeros(1), t.new_ones(1)]))
        gamma_t, dgamma_dt = gamma[:B], dgamma[:B]
        if self.schedule_objective == "variance" and gamma_t.requires_grad:
            # variance_step_ reads the objective's gradient at the schedule's outputs.
            gamma_t.retain_grad()
            dgamma_dt.retain_grad()
        gamma_s = gamma[B:2 * B] if T else None
        gamma_0, gamma_1 = gamma[-2], gamma[-1]  # one value for the batch: the ops broadcast it

        # The latent z_t = alpha_t f + sigma_t eps and the network's prediction there.
        eps = self._noise(eps, f, generator)
        labels = self._labels(labels, B, device, generator, drop_labels)
        z_t = ops.diffuse(f, eps, gamma_t)
        weight = diffusion_weight(self.weighting, gamma_t, dgamma_dt, gamma_s, T, self.sigmoid_bias).detach()
        z_in, gamma_in = z_t, gamma_t
        weighted = self.weighting != "elbo"
        if weighted:
            # The weighting's gradient routing (the identity on values): the network's inputs'
            # gradients (z_t, gamma_t) are scaled by 1 / w_i and its output's by w_i. The
            # network then trains on the weighted loss, and the two scalings cancel on every path
            # into the schedule, which still descends the bound. Exact for a network that treats
            # examples independently (no batch statistics), as every score network here does.
            inverse = torch.where(weight > 0, 1.0 / weight, torch.zeros_like(weight))
            z_in, gamma_in = _scale_grad(z_t, inverse), _scale_grad(gamma_t, inverse)
        pred = self._net(z_in, gamma_in, labels, conditioning)
        if weighted:
            pred = _scale_grad(pred, weight)
        eps_0 = self._noise(eps_0, f, generator)  # after the network, whose dropout may share the RNG

        # The bound's three terms and bits per dim, composed once, by the ops: x's values are
        # checked there (one host sync a step), the reconstruction loss needing them anyway.
        terms = ops.vlb_terms(x, eps, pred, eps_0, gamma_t, gamma_0, gamma_1, dgamma_dt=dgamma_dt, gamma_s=gamma_s,
                              T=T, vocab_size=self.vocab_size, prediction=self.prediction)
        return VDMOutput(*terms, t, gamma_t, dgamma_dt, weight)

    def objective(self, out: VDMOutput) -> Tensor:
        """The training objective of a forward's ``out``, per example ``[B]``, in bits per dim.

        Under ``"elbo"``: the bound, ``out.bpd``. Under another weighting: the weighted loss's
        value (the diffusion term times ``out.weight``) carrying the gradient of the bound's
        graph, which the forward routed (the network's share weighted, the schedule's the
        bound's)."""
        if self.weighting == "elbo":
            return out.bpd
        weighted = bits_per_dim(out.reconstruction + out.prior + out.weight * out.diffusion, self._dims)
        return out.bpd + (weighted - out.bpd).detach()

    def variance_gradients(self, out: VDMOutput, grad_gamma: Tensor, grad_dgamma: Optional[Tensor]) -> tuple:
        """For a ``schedule_objective="variance"`` model: the schedule network's gradients of
        ``mean_i L_i^2`` (``L_i``: example i's diffusion loss ``out.diffusion`` in bits per dim),
        in the order of ``schedule.network()``, for the caller to use in place of the bound's
        (the endpoints keep the bound's gradient).

        ``grad_gamma``, ``grad_dgamma``: the gradients of ``objective(out).mean()`` at
        ``out.gamma_t`` and ``out.dgamma_dt`` (e.g. their ``.grad`` after ``retain_grad()`` and
        the backward); ``grad_dgamma`` may be None (no gradient reached it: zeros). They are those
        of the batch mean, ``dL_i/dgamma_i / B``, so the result is the gradient of the mean."""
        if self.schedule_objective != "variance":
            raise RuntimeError("variance_gradients needs schedule_objective='variance'")
        if grad_gamma is None:
            raise RuntimeError("variance_gradients runs after a training forward and its backward")
        if grad_dgamma is None:
            grad_dgamma = torch.zeros_like(grad_gamma)
        loss = bits_per_dim(out.diffusion.detach(), self._dims)
        return self.schedule.variance_gradients(out.t, grad_gamma, grad_dgamma, loss)

    def variance_step_(self, out: VDMOutput) -> list:
        """After ``objective(out).mean().backward()`` of a ``schedule_objective="variance"``
        model: replace the schedule network's gradients by those of the variance
        (``variance_gradients``). Returns the parameters whose ``.grad`` it set, which a
        data-parallel trainer averages over its processes (the backward's all-reduce has passed)."""
        if out.gamma_t.grad is None:
            raise RuntimeError("variance_step_ runs after the backward of a training forward's objective")
        params = list(self.schedule.network())
        for p, g in zip(params, self.variance_gradients(out, out.gamma_t.grad, out.dgamma_dt.grad)):
            p.grad = g
        return params

    @torch.no_grad()
    def bpd(self, x: Tensor, T: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
        """Bits per dim of each image (one Monte-Carlo sample of the bound; ``T = 0``: continuous).

        Uses the module's current mode: call ``.eval()`` first to turn dropout off.
        """
        return self(x, T, generator).bpd

    def predict_eps(self, z: Tensor, gamma: Tensor, labels: Optional[Tensor] = None, guidance: float = 0.0) -> Tensor:
        """The network's noise prediction at ``(z, gamma)``, whatever it predicts (x, v and score
        converted to eps), in the model's autocast: what the samplers, the ODE likelihood, the
        codec and the diffusers scheduler call. ``labels`` ``[B]`` of a conditional model
        (``num_classes``: no class); ``guidance`` w: classifier-free guidance,
        ``(1 + w) eps(z, c) - w eps(z)`` (0: the plain conditional prediction)."""
        eps_c = to_eps(self._net(z, gamma, labels), z, gamma, self.prediction)
        if labels is None or guidance == 0.0:
            return eps_c
        null = torch.full_like(labels, self.num_classes)
        eps_u = to_eps(self._net(z, gamma, null), z, gamma, self.prediction)
        return (1.0 + guidance) * eps_c - guidance * eps_u

    @torch.no_grad()
    def sample(self, n: int, T: int, generator: Optional[torch.Generator] = None,
               device=None, sample_x: bool = False, labels: Optional[Tensor] = None,
               guidance: float = 0.0, *, sampler: str = "ancestral", eta: Optional[float] = None,
               spacing: Optional[str] = None) -> Tensor:
        """``n`` images (int64 ``[n, C, H, W]``) by ancestral sampling with ``T`` steps from
        ``z_1 ~ N(0, I)``, decoded at ``z_0`` by argmax (or sampled, ``sample_x=True``).

        A conditional model takes ``labels [n]`` (``num_classes``: unconditional) and a
        classifier-free ``guidance`` scale w >= 0 (0: the plain conditional model).

        ``sampler="ddim"`` (with ``eta`` in [0, 1], default 0) or ``"dpm-solver"``
        (DPM-Solver++(2M)) take ``T`` steps of that sampler instead; ``spacing``: ``"time"`` or
        ``"lambda"`` (uniform log-SNR). See ``vdm_fast.samplers``, which this calls."""
        from vdm_fast.samplers import sample  # samplers is imported by nothing below it: a cycle never forms here

        validate.finite_number("n", n, positive=True, integer=True)
        validate.finite_number("T", T, positive=True, integer=True)
        return sample(self, n, T, sampler, eta=eta, spacing=spacing, generator=generator, device=device,
                      sample_x=sample_x, labels=labels, guidance=guidance)
