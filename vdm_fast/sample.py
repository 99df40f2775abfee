"""Samples of a trained VDM as a PNG grid or a .npy array: ``python -m vdm_fast.sample --ckpt PATH``.

``--sampler ancestral|ddim|dpm-solver|dpm-solver-sde --steps N`` (``--T`` is the same flag, kept for the
ancestral steps; ancestral at 1000 steps is the default and gives today's images), ``--eta``
for ddim, ``--out FILE.npy`` for the integer images themselves (int64 ``[N, C, H, W]``)."""

import argparse
import math

import numpy as np
import torch

from vdm_fast._extras import require

require("train")  # a one-line message, not an ImportError, without the extra

from PIL import Image

from vdm_fast import cli
from vdm_fast.checkpoint import model_for_cli
from vdm_fast.samplers import DEFAULT_SPACING, SAMPLERS, SPACINGS, check_sampler, network_evaluations

DEFAULT_STEPS = {"ancestral": 1000, "ddim": 100, "dpm-solver": 20, "dpm-solver-sde": 20}


def save_grid(images: torch.Tensor, vocab_size: int, path, scale: int = 1) -> None:
    """Integer images ``[N, C, H, W]`` (C = 1 or 3) as one PNG, near-square grid, 1-pixel gaps."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    pixels = (images.float() * 255.0 / (vocab_size - 1)).round().clamp(0, 255).byte()
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = pixels[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=cli.prog("vdm_fast.sample"), description=__doc__)
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint.pt of a training run, or a folder written by python -m vdm_fast.export")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ancestral",
                        help="ancestral (the model's own chain), ddim (--eta), dpm-solver (DPM-Solver++(2M), the "
                             "probability-flow ODE) or dpm-solver-sde (SDE-DPM-Solver++(2M), stochastic)")
    parser.add_argument("--steps", "--T", dest="steps", type=int, default=None,
                        help="sampling steps (--T: the same flag, the ancestral steps of earlier versions); default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()))
    parser.add_argument("--eta", type=float, default=None,
                        help="ddim only: 0 deterministic (the default), 1 the ancestral chain's noise")
    parser.add_argument("--spacing", choices=SPACINGS, default=None,
                        help="the time grid: uniform in t or in log-SNR lambda; default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_SPACING.items()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", type=int, default=-1,
                        help="class of a conditional model (-1: cycle through the classes)")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--out", default="samples.png",
                        help="FILE.npy: the integer images, int64 [N, C, H, W]; any other name: a PNG grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    steps = DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    try:
        check_sampler(args.sampler, args.eta, args.spacing)
    except ValueError as err:
        parser.error(str(err))
    model, _, _ = model_for_cli(args.ckpt)
    model.to(args.device).eval()
    labels = None
    if model.num_classes:
        if not -1 <= args.label <= model.num_classes:
            raise SystemExit(f"error: --label must be in [-1, {model.num_classes}], got {args.label}")
        labels = (torch.arange(args.n) % model.num_classes if args.label < 0
                  else torch.full((args.n,), args.label)).to(args.device)
    images = model.sample(args.n, steps, generator=torch.Generator(args.device).manual_seed(args.seed),
                          labels=labels, guidance=args.guidance, sampler=args.sampler, eta=args.eta,
                          spacing=args.spacing)
    if str(args.out).lower().endswith(".npy"):
        np.save(args.out, images.cpu().numpy().astype(np.int64), allow_pickle=False)
    else:
        save_grid(images, model.vocab_size, args.out, scale=max(1, 128 // model.image_shape[-1]))
    guided = labels is not None and args.guidance != 0.0
    print(f"wrote {args.n} samples ({args.sampler}, {steps} steps, {network_evaluations(steps, guided)} network "
          f"evaluations) to {args.out}")


if __name__ == "__main__":
    main()
