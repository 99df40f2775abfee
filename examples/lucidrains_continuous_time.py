"""lucidrains' ``ContinuousTimeGaussianDiffusion`` (denoising-diffusion-pytorch) trained on the
VDM bound computed by ``vdm_fast.ops`` instead of its own MSE loss: a subclass that replaces
``p_losses``, on scikit-learn's digits, CPU, under a minute.

    pip install ".[train,integrations]" && python examples/lucidrains_continuous_time.py [--steps 150]

Its ``log_snr`` schedule is ``-gamma`` in VDM's terms (``gamma_and_derivative`` gives gamma'), its
``Unet`` is conditioned on log-SNR, and its images in ``[0, 1]`` hold 17 levels here, so the loss
is the full bound in bits per dim: reconstruction, prior and the continuous-time diffusion term.
"""

import argparse

import torch
from denoising_diffusion_pytorch import ContinuousTimeGaussianDiffusion, Unet

from vdm_fast import ops
from vdm_fast.training.data import load_digits
from vdm_fast.nn import gamma_and_derivative

LEVELS = 17


class VDMBoundDiffusion(ContinuousTimeGaussianDiffusion):
    def p_losses(self, x_start, times, noise=None, loss_reduction="mean"):
        x = ((x_start + 1) / 2 * (LEVELS - 1)).round()  # back to integer levels from [-1, 1]
        f = ops.encode(x, LEVELS)
        eps = torch.randn_like(f) if noise is None else noise
        gamma, dgamma = gamma_and_derivative(lambda t: -self.log_snr(t), times)
        ends = -self.log_snr(torch.tensor([0.0, 1.0], device=f.device))
        eps_hat = self.model(ops.diffuse(f, eps, gamma), -gamma)
        bpd = ops.vlb_terms(x, eps, eps_hat, torch.randn_like(f), gamma, ends[0], ends[1], dgamma_dt=dgamma,
                            vocab_size=LEVELS).bpd
        return bpd if loss_reduction == "none" else bpd.mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    unet = Unet(dim=16, dim_mults=(1, 2), channels=1, learned_sinusoidal_cond=True)
    diffusion = VDMBoundDiffusion(unet, image_size=8, channels=1, noise_schedule="learned")
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=2e-3)
    images = digits.train.images.float() / (LEVELS - 1)  # lucidrains' convention: images in [0, 1]
    for step in range(1, args.steps + 1):
        loss = diffusion(images[torch.randint(0, len(images), (64,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: train bpd {loss.item():.3f}")
    with torch.no_grad():
        test = digits.test.images.float() / (LEVELS - 1)
        bpd = diffusion(test, times=torch.rand(len(test), generator=torch.Generator().manual_seed(0))).item()
    print(f"test bpd {bpd:.3f}")
    return bpd


if __name__ == "__main__":
    main()
