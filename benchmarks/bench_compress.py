"""Bits-back compression with a trained VDM: bit-exact round trip, rate against the model's
T-step negative ELBO and against PNG, zlib, lzma and the per-pixel histogram, and speed.

    python benchmarks/bench_compress.py --ckpt runs/vdm/checkpoint.pt [--n 100] [--T 100]

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

from vdm_fast import compress, data
from vdm_fast.checkpoint import model_from_checkpoint

try:
    from benchmarks.common import table
except ImportError:  # run as a script from the repository root
    from common import table


def png_bits(images, vocab):
    """Each image as its own 8-bit PNG (values scaled to 0..255), at Pillow's best compression."""
    total = 0
    for img in images:
        arr = (img.permute(1, 2, 0).numpy() * (255 // (vocab - 1))).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", optimize=True)
        total += 8 * len(buf.getvalue())
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=100, help="test images")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--elbo-samples", type=int, default=100, help="Monte-Carlo samples of the bound")
    args = parser.parse_args()

    model, cfg, _ = model_from_checkpoint(args.ckpt)
    ds = data.load(cfg.data, cfg.data_dir)
    images = ds.test.images[: args.n].long()
    dims = images[0].numel()
    n_bits = len(images) * dims

    t0 = time.perf_counter()
    stream = compress.encode(model, images, T=args.T, chunk=args.chunk, progress=True)
    t1 = time.perf_counter()
    decoded = compress.decode(model, stream, progress=True)
    t2 = time.perf_counter()
    exact = torch.equal(decoded, images)
    report = compress.rate_report(stream, len(images), dims)

    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        nelbo = torch.stack([model.bpd(images, T=args.T, generator=g) for _ in range(args.elbo_samples)])
    per_run = nelbo.mean(1)
    nelbo_mean, nelbo_err = per_run.mean().item(), per_run.std().item() / math.sqrt(len(per_run))

    raw = images.to(torch.uint8).numpy().tobytes()
    rows = [
        {"method": f"VDM bits-back, net (T={args.T})", "bpd": f"{report['net_bpd']:.4f}"},
        {"method": f"VDM bits-back, whole file ({report['overhead_bits']} bits initial overhead)",
         "bpd": f"{report['total_bpd']:.4f}"},
        {"method": f"VDM negative ELBO (T={args.T}, {args.elbo_samples} samples)",
         "bpd": f"{nelbo_mean:.4f} ± {nelbo_err:.4f}"},
        {"method": "per-pixel histogram (fitted on train)",
         "bpd": f"{data.histogram_bpd(ds.train.images, ds.test.images[: args.n], ds.vocab_size):.4f}"},
        {"method": "PNG, one file per image", "bpd": f"{png_bits(images, ds.vocab_size) / n_bits:.4f}"},
        {"method": "zlib -9 of the raw bytes", "bpd": f"{8 * len(zlib.compress(raw, 9)) / n_bits:.4f}"},
        {"method": "lzma of the raw bytes", "bpd": f"{8 * len(lzma.compress(raw, preset=9)) / n_bits:.4f}"},
    ]
    print()
    print(f"## Bits-back compression, {cfg.data} test images (n={len(images)}, {dims} dims each)\n")
    print(f"round trip bit-exact: {exact}; net rate / negative ELBO = {report['net_bpd'] / nelbo_mean:.4f}; "
          f"encode {len(images) / (t1 - t0):.1f} images/s, decode {len(images) / (t2 - t1):.1f} images/s "
          f"(chunk {args.chunk}, CPU float64, 1 thread)\n")
    print(table(rows, ["method", "bpd"]))


if __name__ == "__main__":
    main()
