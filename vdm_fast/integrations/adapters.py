"""Score networks from other libraries, behind vdm_fast's network contract.

The contract (what ``VDM`` and the ops expect): ``eps_hat = network(z_t, gamma_t[, labels])``,
``z_t`` the noisy images ``[B, C, H, W]``, ``gamma_t`` the schedule's value per example ``[B]``
(``gamma = -log SNR``), and a tensor of the shape of ``z_t`` back (by default an eps prediction;
``VDM(prediction=...)`` names another). A timestep-conditioned network needs gamma turned into
its own time input; these adapters do that and unwrap the library's output type.
"""

from typing import Optional

from torch import Tensor, nn


class DiffusersUNet(nn.Module):
    """A ``diffusers`` 2-D U-Net (``UNet2DModel``) with the contract: ``gamma`` in
    ``[gamma_min, gamma_max]`` maps linearly to the continuous timestep ``[0, 1000]`` it embeds
    (the VDM U-Net's own time input), and ``labels`` go to its ``class_labels``."""

    def __init__(self, unet: nn.Module, gamma_min: float = -13.3, gamma_max: float = 5.0):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min must be < gamma_max, got {gamma_min} and {gamma_max}")
        self.unet, self.gamma_min, self.gamma_max = unet, float(gamma_min), float(gamma_max)

    def timestep(self, gamma_t: Tensor) -> Tensor:
        return 1000.0 * (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def forward(self, z_t: Tensor, gamma_t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        out = self.unet(z_t, self.timestep(gamma_t), class_labels=labels, return_dict=False)
        return out[0]


class LogSNRUNet(nn.Module):
    """A network conditioned on log-SNR, as lucidrains' ``Unet`` is in the continuous-time
    classes of ``denoising-diffusion-pytorch`` (``model(x, log_snr)``): called with
    ``log_snr = -gamma``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, z_t: Tensor, gamma_t: Tensor) -> Tensor:
        return self.unet(z_t, -gamma_t)


def from_diffusers(unet: nn.Module, gamma_min: float = -13.3, gamma_max: float = 5.0) -> DiffusersUNet:
    """``unet`` (a ``diffusers.UNet2DModel``) as a vdm_fast score network; ``gamma_min``,
    ``gamma_max``: the schedule's configured endpoints, which set the timestep scale."""
    return DiffusersUNet(unet, gamma_min, gamma_max)


def from_denoising_diffusion_pytorch(unet: nn.Module) -> LogSNRUNet:
    """lucidrains' ``Unet`` (built with ``random_or_learned_sinusoidal_cond=True``, as its
    continuous-time classes require) as a vdm_fast score network."""
    if not getattr(unet, "random_or_learned_sinusoidal_cond", True):
        raise ValueError("build the Unet with random_or_learned_sinusoidal_cond=True: its default sinusoidal "
                         "embedding expects integer timesteps, not log-SNR")
    return LogSNRUNet(unet)
