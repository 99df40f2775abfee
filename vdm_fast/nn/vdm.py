"""The VDM model: a noise schedule and a score network, trained on the variational bound."""

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from vdm_fast import ops
from vdm_fast.ops import _checks
from vdm_fast.ops.loss import VLBTerms
from vdm_fast.reference.loss import alpha_sigma, ancestral_step, decode, discretize_time, encode
from vdm_fast.reference.schedule import antithetic_times


class VDM(nn.Module):
    """A Variational Diffusion Model over integer images ``[B, C, H, W]`` in ``[0, vocab_size)``.

    Args:
        score_net: ``eps_hat = score_net(z_t, gamma_t)``, e.g. ``vdm_fast.nn.ScoreUNet``.
        schedule: ``(gamma, gamma') = schedule(t)``, e.g. ``vdm_fast.nn.LearnedScalarSchedule``.
        image_shape: ``(C, H, W)`` of the data, used by ``sample``.
        vocab_size: number of intensity levels (256 for 8-bit images).
        antithetic: draw training times as ``(u + i / B) mod 1`` (lower variance).
    """

    def __init__(self, score_net: nn.Module, schedule: nn.Module, image_shape: Sequence[int],
                 vocab_size: int = 256, antithetic: bool = True):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        _checks.finite_number("vocab_size", vocab_size, positive=True, integer=True)
        self.score_net, self.schedule = score_net, schedule
        self.image_shape = tuple(int(s) for s in image_shape)
        self.vocab_size, self.antithetic = vocab_size, antithetic

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters: data, noise and times are drawn in it."""
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def _times(self, B: int, device, generator) -> Tensor:
        if self.antithetic:
            return antithetic_times(B, generator=generator, device=device, dtype=self.dtype)
        return torch.rand(B, generator=generator, device=device, dtype=self.dtype)

    def forward(self, x: Tensor, T: int = 0, generator: Optional[torch.Generator] = None, *,
                t: Optional[Tensor] = None, eps: Optional[Tensor] = None,
                eps_0: Optional[Tensor] = None) -> VLBTerms:
        """One Monte-Carlo estimate of the bound's terms for each image of ``x``.

        ``T = 0``: continuous-time diffusion loss; ``T > 0``: the T-step discrete-time loss.
        The times ``t [B]`` and noises ``eps``, ``eps_0`` (shape of ``x``) are drawn from
        ``generator`` unless given (a data-parallel trainer slices them from a global draw).
        """
        _checks.finite_number("T", T, integer=True)
        if T < 0:
            raise ValueError(f"T must be >= 0 (0: continuous time), got {T}")
        _checks.images("x", x, self.vocab_size)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be [B, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        B, device, dtype = x.shape[0], x.device, self.dtype
        f = encode(x, self.vocab_size, dtype)

        t = self._times(B, device, generator) if t is None else t.to(device, dtype)
        times = [t, t.new_zeros(1), t.new_ones(1)]
        if T > 0:
            t, s = discretize_time(t, T)
            times = [t, s] + times[1:]
        # One schedule call for every time the bound needs: t (and s), 0 and 1.
        gamma, dgamma_dt = self.schedule(torch.cat(times))
        gamma_t, dgamma_dt = gamma[:B], dgamma_dt[:B]
        gamma_0, gamma_1 = gamma[-2].expand(B), gamma[-1].expand(B)

        def noise(given):
            if given is None:
                return torch.randn(f.shape, generator=generator, device=device, dtype=dtype)
            return given.to(device, dtype)

        eps = noise(eps)
        eps_hat = self.score_net(ops.diffuse(f, eps, gamma_t), gamma_t)
        return ops.vlb_terms(x, eps, eps_hat, noise(eps_0), gamma_t, gamma_0, gamma_1, dgamma_dt=dgamma_dt,
                             gamma_s=gamma[B:2 * B] if T else None, T=T, vocab_size=self.vocab_size)

    @torch.no_grad()
    def bpd(self, x: Tensor, T: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
        """Bits per dim of each image (one Monte-Carlo sample of the bound; ``T = 0``: continuous).

        Uses the module's current mode: call ``.eval()`` first to turn dropout off.
        """
        return self(x, T, generator).bpd

    @torch.no_grad()
    def sample(self, n: int, T: int, generator: Optional[torch.Generator] = None,
               device=None, sample_x: bool = False) -> Tensor:
        """``n`` images (int64 ``[n, C, H, W]``) by ancestral sampling with ``T`` steps from
        ``z_1 ~ N(0, I)``, decoded at ``z_0`` by argmax (or sampled, ``sample_x=True``)."""
        _checks.finite_number("n", n, positive=True, integer=True)
        _checks.finite_number("T", T, positive=True, integer=True)
        device = device if device is not None else next(self.parameters()).device
        z = torch.randn((n, *self.image_shape), generator=generator, device=device, dtype=self.dtype)
        grid = torch.arange(T, -1, -1, device=device, dtype=self.dtype) / T  # 1, ..., 1/T, 0
        gammas, _ = self.schedule(grid)
        gammas = gammas.detach()
        for i in range(T):
            gamma_t, gamma_s = gammas[i].expand(n), gammas[i + 1].expand(n)
            eps_hat = self.score_net(z, gamma_t)
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
            z = ancestral_step(z, eps_hat, gamma_t, gamma_s, noise)
        gamma_0 = gammas[T].expand(n)
        alpha_0, _ = alpha_sigma(gamma_0)
        return decode(z / alpha_0[:, None, None, None], gamma_0, self.vocab_size, sample_x, generator)
