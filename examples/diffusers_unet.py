"""A ``diffusers.UNet2DModel`` as the score network of vdm_fast's VDM, trained on scikit-learn's
bundled digits (17 intensity levels) on the CPU in under a minute.

    pip install ".[train,integrations]" && python examples/diffusers_unet.py [--steps 150]

The only glue is ``from_diffusers``: it maps gamma to the U-Net's timestep and unwraps its output.
"""

import argparse

import torch
from diffusers import UNet2DModel

from vdm_fast.training.data import load_digits
from vdm_fast.integrations.adapters import from_diffusers
from vdm_fast.nn import VDM, LearnedScalarSchedule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    model = VDM(from_diffusers(unet, gamma_min=-7.0, gamma_max=5.0), LearnedScalarSchedule(-7.0, 5.0),
                image_shape=(1, 8, 8), vocab_size=17)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(1, args.steps + 1):
        x = digits.train.images[torch.randint(0, len(digits.train.images), (64,))]
        loss = model(x).bpd.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: train bpd {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        bpd = model(digits.test.images, generator=torch.Generator().manual_seed(0)).bpd.mean().item()
    print(f"test bpd {bpd:.3f}")
    return bpd


if __name__ == "__main__":
    main()
