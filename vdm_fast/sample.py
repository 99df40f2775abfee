"""Samples of a trained VDM as a PNG grid: ``python -m vdm_fast.sample --ckpt PATH``."""

import argparse
import math

import numpy as np
import torch

from vdm_fast._extras import require

require("train")  # a one-line message, not an ImportError, without the extra

from PIL import Image

from vdm_fast.checkpoint import model_for_cli


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
    parser = argparse.ArgumentParser(prog="python -m vdm_fast.sample", description=__doc__)
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint.pt of a training run, or a folder written by python -m vdm_fast.export")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--T", type=int, default=1000, help="ancestral sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", type=int, default=-1,
                        help="class of a conditional model (-1: cycle through the classes)")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model, _, _ = model_for_cli(args.ckpt)
    model.to(args.device).eval()
    labels = None
    if model.num_classes:
        if not -1 <= args.label <= model.num_classes:
            raise SystemExit(f"error: --label must be in [-1, {model.num_classes}], got {args.label}")
        labels = (torch.arange(args.n) % model.num_classes if args.label < 0
                  else torch.full((args.n,), args.label)).to(args.device)
    images = model.sample(args.n, args.T, generator=torch.Generator(args.device).manual_seed(args.seed),
                          labels=labels, guidance=args.guidance)
    save_grid(images, model.vocab_size, args.out, scale=max(1, 128 // model.image_shape[-1]))
    print(f"wrote {args.n} samples (T={args.T}) to {args.out}")


if __name__ == "__main__":
    main()
