"""A ``diffusers`` scheduler on a vdm_fast schedule: ``VDMScheduler``.

Needs the ``integrations`` extra (``pip install 'vdm_fast[integrations]'``); importing
``vdm_fast`` (or ``vdm_fast.samplers``) never imports ``diffusers``, only this module does.

The scheduler holds the schedule's ``gamma(t)`` in its config, so ``save_pretrained`` /
``from_pretrained`` (diffusers' ``ConfigMixin``, ``scheduler_config.json``) keep it: the fixed
and learned-scalar schedules as their two endpoints (``schedule="linear"``), the monotone network
as its parameters (``schedule="nnet"``, pinned endpoints too), any other schedule as ``gamma`` on
an even grid of ``t`` (``schedule="grid"``, interpolated linearly). It steps as
``vdm_fast.samplers`` does (``sampler="ancestral"``, ``"ddim"`` with ``eta``, ``"dpm-solver"``,
``"dpm-solver-sde"``):
the same steps on the same grid, so with the same generator a diffusers-style loop reproduces
``vdm_fast.samplers.denoise``.

Timesteps are continuous: ``timesteps = t * num_train_timesteps`` (float32; 1000 ... 1 at 1000
steps; ``t = 0``, the data, is where the last step lands and is never passed). A VDM's score
network takes ``gamma``, not a timestep; ``scheduler.eps_model(vdm)`` wraps it (guidance and
labels included) so that it takes the loop's timestep, looking its ``gamma`` up in the
scheduler's table::

    from vdm_fast.integrations.diffusers_scheduler import VDMScheduler
    from vdm_fast.samplers import decode

    scheduler = VDMScheduler.from_vdm(model)            # model: a trained vdm_fast VDM
    scheduler.set_timesteps(1000)
    eps_model = scheduler.eps_model(model)              # eps = eps_model(z, t)
    g = torch.Generator().manual_seed(0)
    z = torch.randn((n, *model.image_shape), generator=g)
    for t in scheduler.timesteps:
        eps = eps_model(z, t)
        z = scheduler.step(eps, t, z, generator=g).prev_sample
    images = decode(model, z)                           # integer images [n, C, H, W]

which gives the images of ``model.sample(n, 1000, generator=torch.Generator().manual_seed(0))``.
A network trained in diffusers' timestep convention instead (e.g. a ``UNet2DModel`` behind
``vdm_fast.integrations.adapters.from_diffusers`` with a fixed linear schedule: timestep ``1000 t``) can be called
with the loop's ``t`` directly.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
except ImportError as err:  # pragma: no cover (the extra is installed where this is tested)
    raise ImportError("vdm_fast.integrations.diffusers_scheduler needs the 'integrations' extra (diffusers); install it with: "
                      "pip install 'vdm_fast[integrations]'") from err

from vdm_fast import samplers
from vdm_fast.nn.schedule import FixedLinearSchedule, LearnedScalarSchedule, MonotoneNetSchedule
from vdm_fast.diffusion.pixels import decode as _decode
from vdm_fast.diffusion.parameterization import to_eps
from vdm_fast.diffusion.process import alpha_sigma, per_example
from vdm_fast.diffusion.sampling import ancestral_step
from vdm_fast.reference.schedule import nnet_gamma

SCHEDULE_KINDS = ("linear", "nnet", "grid")
NNET_PARAMS = ("w1", "b1", "w2", "b2", "w3")
_NNET_SHAPES = {"w1": (1, 1), "b1": (1,), "w2": (-1, 1), "b2": (-1,), "w3": (1, -1)}
# diffusers' names of the predictions -> vdm_fast's
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}


@dataclass
class VDMSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent at the next (less noisy) time; ``pred_original_sample``: the
    data prediction ``x_hat = (z_t - sigma_t eps) / alpha_t`` at this one."""

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


class VDMScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler on a vdm_fast noise schedule ``gamma(t)`` (see the module).

    Args:
        num_train_timesteps: the timestep scale: ``timestep = t * num_train_timesteps``.
        schedule: ``"linear"`` (``gamma_min + (gamma_max - gamma_min) t``: the fixed and the
            learned-scalar schedules), ``"nnet"`` (the monotone network of ``nnet``'s
            parameters) or ``"grid"`` (``gamma_grid`` at ``t = 0, 1/(K-1), ..., 1``).
        gamma_min, gamma_max: the linear schedule's ``gamma(0)``, ``gamma(1)``.
        nnet: ``{"w1", "b1", "w2", "b2", "w3"}`` as flat lists (``MonotoneNetSchedule``'s
            parameters), and ``"gamma_0"``, ``"gamma_1"`` for the pinned schedule.
        gamma_grid: ``K >= 2`` increasing values of ``gamma``.
        sampler, eta, timestep_spacing: as ``vdm_fast.samplers.sample``'s ``sampler``, ``eta``
            and ``spacing`` (``"time"`` or ``"lambda"``; None: the sampler's default).
        prediction_type: what ``step`` is given: ``"epsilon"``, ``"sample"`` (x) or
            ``"v_prediction"``.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear", gamma_min: float = -13.3,
                 gamma_max: float = 5.0, nnet: Optional[dict] = None, gamma_grid: Optional[list] = None,
                 sampler: str = "ancestral", eta: Optional[float] = None, timestep_spacing: Optional[str] = None,
                 prediction_type: str = "epsilon"):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        if schedule not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS}, got {schedule!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {tuple(PREDICTION_TYPES)}, got {prediction_type!r}")
        self._eta, self._spacing = samplers.check_sampler(sampler, eta, timestep_spacing)
        self._gamma_fn = self._build_schedule(schedule, gamma_min, gamma_max, nnet, gamma_grid)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.empty(0)
        self._times = self._gammas = None
        self._last = None  # (index, x_hat, h) of the previous dpm-solver step

    # --- the schedule ------------------------------------------------------------------------

    @staticmethod
    def _build_schedule(kind, gamma_min, gamma_max, nnet_params, gamma_grid) -> Callable[[Tensor], Tensor]:
        if kind == "linear":
            lo, hi = float(gamma_min), float(gamma_max)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"gamma_min must be < gamma_max (both finite), got {gamma_min} and {gamma_max}")
            return lambda t: lo + (hi - lo) * t
        if kind == "nnet":
            if not isinstance(nnet_params, dict) or any(k not in nnet_params for k in NNET_PARAMS):
                raise ValueError(f"schedule='nnet' needs nnet = a dict of {NNET_PARAMS} (flat lists)")
            p = {k: torch.tensor(nnet_params[k], dtype=torch.float64).reshape(_NNET_SHAPES[k]) for k in NNET_PARAMS}
            if p["w2"].shape[0] != p["b2"].shape[0] or p["w2"].shape[0] != p["w3"].shape[1]:
                raise ValueError("nnet: w2, b2 and w3 must have one value per hidden unit each")
            g = lambda t: nnet_gamma(t.reshape(-1), *(p[k].to(t.device) for k in NNET_PARAMS)).reshape(t.shape)  # noqa: E731
            if "gamma_0" not in nnet_params:
                return g
            g0, g1 = float(nnet_params["gamma_0"]), float(nnet_params["gamma_1"])
            ends = g(torch.tensor([0.0, 1.0], dtype=torch.float64))
            return lambda t: g0 + (g1 - g0) * (g(t) - ends[0].to(t.device)) / (ends[1] - ends[0]).to(t.device)
        values = torch.tensor(gamma_grid if gamma_grid is not None else [], dtype=torch.float64)
        if values.dim() != 1 or len(values) < 2 or not torch.isfinite(values).all() or (values[1:] < values[:-1]).any():
            raise ValueError("schedule='grid' needs gamma_grid: at least 2 finite, increasing values")

        def interpolate(t: Tensor) -> Tensor:
            v = values.to(t.device)
            pos = t.clamp(0.0, 1.0) * (len(v) - 1)
            i = pos.floor().long().clamp(max=len(v) - 2)
            return v[i] + (pos - i) * (v[i + 1] - v[i])
        return interpolate

    @torch.no_grad()
    def gamma(self, t: Tensor) -> Tensor:
        """``gamma(t)`` of the schedule, float64 (``t`` in ``[0, 1]``, any shape)."""
        return self._gamma_fn(torch.as_tensor(t, dtype=torch.float64))

    @classmethod
    def from_schedule(cls, schedule: Callable, grid: int = 1025, **kwargs) -> "VDMScheduler":
        """The scheduler of a vdm_fast schedule module (its current parameters) or of any
        increasing ``t -> gamma`` callable (sampled at ``grid`` even times); ``kwargs`` go to
        the constructor (``sampler``, ``eta``, ``num_train_timesteps``, ...)."""
        if isinstance(schedule, MonotoneNetSchedule):
            params = {k: v.detach().double().reshape(-1).tolist() for k, v in zip(NNET_PARAMS, schedule.network())}
            if schedule.pinned:
                params["gamma_0"], params["gamma_1"] = float(schedule.gamma_0.detach()), float(schedule.gamma_1.detach())
            return cls(schedule="nnet", nnet=params, **kwargs)
        if isinstance(schedule, LearnedScalarSchedule):
            b, w = float(schedule.b.detach().double()), float(schedule.w.detach().double().abs())
            return cls(schedule="linear", gamma_min=b, gamma_max=b + w, **kwargs)
        if isinstance(schedule, FixedLinearSchedule):
            return cls(schedule="linear", gamma_min=schedule.gamma_min, gamma_max=schedule.gamma_max, **kwargs)
        t = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)
        with torch.no_grad():
            out = schedule(t)
        values = (out[0] if isinstance(out, tuple) else out).detach().double()
        return cls(schedule="grid", gamma_grid=values.tolist(), **kwargs)

    @classmethod
    def from_vdm(cls, model, **kwargs) -> "VDMScheduler":
        """``from_schedule(model.schedule, **kwargs)`` of a ``vdm_fast.nn.VDM``."""
        return cls.from_schedule(model.schedule, **kwargs)

    # --- the diffusers API -------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """The grid of ``num_inference_steps`` steps from ``t = 1`` to ``t = 0`` (the one
        ``vdm_fast.samplers`` uses for this sampler and spacing); ``timesteps`` gets the
        ``num_inference_steps`` times the network is called at, ``t * num_train_timesteps``."""
        times, gammas = samplers.time_grid(self, num_inference_steps, self._spacing, dtype=torch.float64)
        self.num_inference_steps = int(num_inference_steps)
        self._times, self._gammas = times, gammas
        self.timesteps = (times[:-1] * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self._last = None

    def _index(self, timestep) -> int:
        if self._gammas is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0].item()
        return int((self.timesteps.cpu() - t).abs().argmin())

    def gamma_for_timestep(self, timestep, like: Optional[Tensor] = None) -> Tensor:
        """``gamma`` at ``timestep`` (a number, a 0-d or a ``[B]`` tensor): the table's exact value
        at the timesteps of ``set_timesteps``, the schedule's at ``timestep /
        num_train_timesteps`` elsewhere; ``[B]`` (``B`` from ``like``'s batch when given), in
        ``like``'s dtype and device."""
        ts = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        gamma = self.gamma(ts / self.config.num_train_timesteps)
        if self._gammas is not None and len(self.timesteps):
            table = self.timesteps.cpu().double()
            hit = (ts[:, None] == table[None, :])
            found = hit.any(dim=1)
            gamma = torch.where(found, self._gammas[:-1].cpu()[hit.float().argmax(dim=1)], gamma)
        if like is not None:
            gamma = gamma.to(like.device, like.dtype).expand(like.shape[0]) if len(gamma) == 1 else \
                gamma.to(like.device, like.dtype)
        return gamma

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The identity: the VDM network takes ``z_t`` as it is."""
        return sample

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Optional[torch.Generator] = None,
             return_dict: bool = True, variance_noise: Optional[Tensor] = None):
        """One step of the sampler from ``timestep`` to the next time of the grid.

        ``model_output``: the network's ``prediction_type`` prediction at ``(sample, timestep)``.
        The stochastic samplers draw their noise (``sample``'s shape, dtype and device) from
        ``generator`` unless ``variance_noise`` is given. Returns ``VDMSchedulerOutput`` (or a
        tuple ``(prev_sample,)`` when ``return_dict=False``)."""
        i = self._index(timestep)
        n = sample.shape[0]
        gamma_t = self._gammas[i].to(sample.device, sample.dtype).expand(n)
        gamma_s = self._gammas[i + 1].to(sample.device, sample.dtype).expand(n)
        eps = to_eps(model_output.to(sample.dtype), sample, gamma_t, PREDICTION_TYPES[self.config.prediction_type])
        alpha_t, sigma_t = alpha_sigma(per_example(gamma_t, sample))
        x_hat = (sample - sigma_t * eps) / alpha_t
        sampler = self.config.sampler
        stochastic = sampler in samplers.STOCHASTIC or (sampler == "ddim" and self._eta > 0)
        noise = None
        if stochastic:
            noise = variance_noise if variance_noise is not None else torch.randn(
                sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        if sampler == "ancestral":
            prev = ancestral_step(sample, eps, gamma_t, gamma_s, noise)
        elif sampler == "ddim":
            prev = samplers.ddim_step(sample, eps, gamma_t, gamma_s, self._eta, noise)
        else:  # the multistep solvers: the previous step's data prediction, if it was the step before
            previous = self._last[1:] if self._last is not None and self._last[0] == i - 1 else (None, None)
            if sampler == "dpm-solver":
                prev = samplers.dpm_solver_step(sample, x_hat, gamma_t, gamma_s, *previous)
            else:
                prev = samplers.sde_dpm_solver_step(sample, x_hat, gamma_t, gamma_s, noise, *previous)
            self._last = (i, x_hat, 0.5 * (gamma_t - gamma_s))
        if not return_dict:
            return (prev,)
        return VDMSchedulerOutput(prev_sample=prev, pred_original_sample=x_hat)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """``z_t = alpha_t x + sigma_t noise`` at ``timesteps`` (one, or one per example), ``x`` the
        encoded images (``vdm_fast.diffusion.pixels.encode``: values in ``[-1, 1]``)."""
        gamma = self.gamma_for_timestep(timesteps, like=original_samples)
        alpha, sigma = alpha_sigma(per_example(gamma, original_samples))
        return alpha * original_samples + sigma * noise.to(original_samples.dtype)

    def decode(self, sample: Tensor, vocab_size: int, sample_x: bool = False,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Integer images from the loop's last latent ``z_0`` with the decoder at this schedule's
        ``gamma(0)`` (``vdm_fast.samplers.decode(model, z_0)`` does the same from the model)."""
        n = sample.shape[0]
        gamma_0 = self.gamma(torch.zeros(1)).to(sample.device, sample.dtype).expand(n)
        alpha_0, _ = alpha_sigma(gamma_0)
        return _decode(sample / alpha_0[:, None, None, None], gamma_0, vocab_size, sample_x, generator)

    def eps_model(self, model, labels: Optional[Tensor] = None, guidance: float = 0.0) -> "VDMEpsModel":
        """``model`` (a ``vdm_fast.nn.VDM``) as ``eps = f(z, timestep)`` for a diffusers loop:
        the noise prediction (classifier-free guided with ``labels``, ``guidance``, as
        ``VDM.sample``) at ``gamma_for_timestep(timestep)``."""
        return VDMEpsModel(model, self, labels, guidance)

    # SchedulerMixin.__len__ is diffusers' convention for the training timesteps
    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # samplers.time_grid reads these of a "model"
    @property
    def dtype(self) -> torch.dtype:
        return torch.float64


class VDMEpsModel(nn.Module):
    """A VDM behind a diffusers-style call ``eps = model(z, timestep)`` (``VDMScheduler.eps_model``)."""

    def __init__(self, model, scheduler: VDMScheduler, labels: Optional[Tensor] = None, guidance: float = 0.0):
        super().__init__()
        self.model, self.scheduler, self.labels, self.guidance = model, scheduler, labels, float(guidance)

    @torch.no_grad()
    def forward(self, sample: Tensor, timestep) -> Tensor:
        gamma = self.scheduler.gamma_for_timestep(timestep, like=sample)
        labels = None if self.labels is None else self.labels.to(sample.device)
        return self.model.predict_eps(sample, gamma, labels, self.guidance)


__all__ = ["VDMScheduler", "VDMSchedulerOutput", "VDMEpsModel"]
