"""Integer images as a PNG grid (the trainer's samples.png, ``vdm-fast sample``); needs the
``train`` extra (Pillow)."""

import math

import numpy as np
import torch
from PIL import Image


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
