"""Bits-back compression with a trained VDM: bit-exact round trip, the whole file's rate against
the model's T-step negative ELBO and against zlib, lzma, PNG, WebP and JPEG XL (lossless) on the
same set of images, and speed.

    python benchmarks/bench_compress.py --ckpt runs/vdm/checkpoint.pt [--n 10 100 0] [--T 100] [--bound-reps 2]

Uses the checkpoint's dataset (its test split). Prints a markdown table.
"""

import argparse
import io
import lzma
import math
import time
import zlib

import numpy as np
import torch
from PIL import Image

from vdm_fast.codec import bitsback, compress
from vdm_fast.training import data
from vdm_fast.io import load_model

try:
    from benchmarks.common import table
except ImportError:  # run as a script from the repository root
    from common import table


def _strip(images, vocab):
    """The images stacked into one 8-bit picture (values scaled to 0..255), as an image codec
    would store a set of them; [n H, W] grey or [n H, W, 3] colour."""
    arr = images.permute(0, 2, 3, 1).numpy().astype(np.int64) * 255 // (vocab - 1)
    arr = arr.reshape(-1, *arr.shape[2:]).astype(np.uint8)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def pillow_bits(images, vocab, **save):
    buf = io.BytesIO()
    Image.fromarray(_strip(images, vocab)).save(buf, **save)
    return 8 * len(buf.getvalue())


def jxl_bits(images, vocab):
    """JPEG XL lossless (imagecodecs' libjxl binding), or None where it is not installed."""
    try:
        import imagecodecs
    except ImportError:
        return None
    return 8 * len(imagecodecs.jpegxl_encode(_strip(images, vocab), lossless=True, effort=9))


def baselines(images, vocab):
    """Bits of each baseline codec on the set of images."""
    raw = images.to(torch.uint8).numpy().tobytes()
    return {"zlib -9": 8 * len(zlib.compress(raw, 9)), "lzma -9": 8 * len(lzma.compress(raw, preset=9)),
            "PNG (Pillow, optimize)": pillow_bits(images, vocab, format="PNG", optimize=True),
            "WebP lossless (Pillow)": pillow_bits(images, vocab, format="WEBP", lossless=True, quality=100, method=6),
            "JPEG XL lossless (imagecodecs)": jxl_bits(images, vocab)}


def direct_bits(model, images, args):
    """What the direct block's model says its images cost (the coder adds at most a few words:
    tests/codec/test_compress.py)."""
    chain = bitsback.Chain(compress.coding_model(model), args.T, args.grid_bits)
    return bitsback.direct_bits(chain, images.reshape(len(images), -1).numpy())


@torch.no_grad()
def stepwise_bound(model, images, T, generator, rows=4096):
    """Each image's T-step negative ELBO (bits per dim) with every step taken once, one noise
    draw each: the sum the coder pays, step by step. (Draws at random times, what
    ``model.bpd`` gives, are heavy-tailed at T = 1000: 50 of them on 40 digits read 3.6 % below
    this estimate, 400 of them agree with it.)"""
    model = compress.coding_model(model)
    total = torch.zeros(len(images), dtype=torch.float64)
    for lo in range(0, len(images), rows):
        x = images[lo:lo + rows]
        per = max(1, rows // len(x))
        for first in range(0, T, per):
            steps = torch.arange(first, min(T, first + per), dtype=torch.float64)
            t = ((steps + 0.5) / T).repeat_interleave(len(x))
            bpd = model(x.repeat(len(steps), 1, 1, 1), T, generator=generator, t=t).bpd
            total[lo:lo + len(x)] += bpd.reshape(len(steps), len(x)).sum(0)
    return total / T


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 0], help="files of the first n test "
                        "images (0: all)")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--max-chunk", type=int, default=32)
    parser.add_argument("--grid-bits", type=int, default=4)
    parser.add_argument("--bound-reps", type=int, default=2, help="estimates of the bound, each over every step")
    args = parser.parse_args()

    model, cfg, _ = load_model(args.ckpt)
    ds = data.load(cfg.data, cfg.data_dir)
    dims = math.prod(model.image_shape)
    rows, speed = [], []
    for n in args.n:
        images = ds.test.images[: n or len(ds.test.images)].long()
        chunks = []
        t0 = time.perf_counter()
        stream = compress.encode(model, images, T=args.T, max_chunk=args.max_chunk, grid_bits=args.grid_bits,
                                 progress=True, chunks=chunks)
        t1 = time.perf_counter()
        exact = torch.equal(compress.decode(model, stream, progress=True), images)
        t2 = time.perf_counter()
        speed.append(f"n = {len(images)}: round trip exact {exact}, encode {len(images) / (t1 - t0):.2f} images/s, "
                     f"decode {len(images) / (t2 - t1):.2f} images/s, {chunks.count(0)} images coded directly, "
                     f"{len(chunks)} chunks")
        g = torch.Generator().manual_seed(0)
        draws = torch.stack([stepwise_bound(model, images, args.T, g) for _ in range(args.bound_reps)])
        direct = chunks.count(0)
        nelbo = draws.mean().item()
        err = f" ± {draws.mean(1).std().item() / math.sqrt(len(draws)):.4f}" if len(draws) > 1 else ""
        tail = draws[:, direct:].mean().item()  # the images coded by bits-back
        payload_bits = compress.rate_report(stream, len(images), dims)["payload_bpd"] * len(images) * dims
        tail_bpd = (payload_bits - direct_bits(model, images[:direct], args)) / ((len(images) - direct) * dims)
        bits = len(images) * dims
        row = {"images": len(images), f"negative ELBO (T={args.T})": f"{nelbo:.4f}{err}",
               "VDM file": f"{8 * len(stream) / bits:.4f}", "file / ELBO": f"{8 * len(stream) / bits / nelbo:.4f}",
               "bits-back part / its ELBO": f"{tail_bpd:.4f} / {tail:.4f} = {tail_bpd / tail:.4f}"}
        row.update({name: "not installed" if b is None else f"{b / bits:.4f}"
                    for name, b in baselines(images, ds.vocab_size).items()})
        rows.append(row)
    print(f"\n## Bits-back compression, {cfg.data} test images ({dims} dims each), bits per dim\n")
    print(f"T = {args.T}, max_chunk {args.max_chunk}, grid 2^-{args.grid_bits} std, CPU float64, "
          f"{torch.get_num_threads()} threads\n")
    print("\n".join(f"- {line}" for line in speed) + "\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
