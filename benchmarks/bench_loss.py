"""Loss family: every way to compute the terms, forward + backward, side by side in one run.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--all-shapes] [--gamma-0 G]

Implementations of each case:
- ``reference``: ``vdm_fast.reference.loss``, plain PyTorch; the reconstruction loss
  materialises ``[B, D, 256]`` logits.
- ``reference, compiled``: ``torch.compile`` of it (inductor; its compile time is the first-call column).
- ``windowed`` and ``windowed, compiled``: the reference with the reconstruction loss written as
  the kernels' algorithm in plain PyTorch ops, logits only at the 2 x 8 + 1 grid points nearest
  each latent; so the table separates what the window gives from what the kernel gives.
- ``vdm_fast``: the fused ops.

Prints a markdown table: milliseconds per forward+backward, the fused ops' speed-up over each,
the peak memory of one call above what was in use before it, the first call's seconds, and the
fused ops' GB/s against the measured copy bandwidth. The
reference's logits do not fit everywhere (over ``--ref-limit-gb``): such rows are left out.
"""

import argparse
import math
import os

import pytest
import torch

from vdm_fast import ops
from vdm_fast.diffusion import pixels
from vdm_fast.reference import loss as ref

try:
    from benchmarks.common import compiled, header, measure, rows, table
except ImportError:  # run as a script from the repository root
    from common import compiled, header, measure, rows, table

SHAPES = [(128, (3, 32, 32)), (512, (3, 32, 32)), (128, (3, 64, 64)), (512, (3, 64, 64))]
WINDOW = 8  # grid points each side of the nearest one: exact to float32 for gamma_0 <= -10


def windowed_reconstruction_loss(x, eps_0, gamma_0, vocab_size=256):
    """``reference.reconstruction_loss`` with the softmax over the ``2 WINDOW + 1`` grid points
    nearest ``z`` only: what a user would write in an afternoon."""
    f = pixels.encode(x, vocab_size, eps_0.dtype)
    g = gamma_0.reshape(-1, *([1] * (x.dim() - 1)))
    z = f + torch.exp(0.5 * g) * eps_0
    precision = torch.exp(-g).unsqueeze(-1)
    nearest = torch.round(((z + 1) * vocab_size - 1) / 2).clamp(0, vocab_size - 1)
    v = nearest.unsqueeze(-1) + torch.arange(-WINDOW, WINDOW + 1, device=x.device, dtype=z.dtype)
    logits = -0.5 * precision * (z.unsqueeze(-1) - ((2 * v + 1) / vocab_size - 1)) ** 2
    logits = logits.masked_fill((v < 0) | (v >= vocab_size), float("-inf"))
    nll = torch.logsumexp(logits, dim=-1) + 0.5 * precision.squeeze(-1) * (z - f) ** 2
    return nll.flatten(1).sum(1)


class Windowed:
    """The loss terms as ``reference`` computes them, but the reconstruction loss windowed."""

    def __init__(self, reconstruction_loss):
        self.reconstruction_loss = reconstruction_loss

    def __getattr__(self, name):
        return getattr(ref, name)


def make_inputs(B, shape, device, gamma_0):
    x = torch.randint(0, 256, (B, *shape), device=device, dtype=torch.uint8)
    f = pixels.encode(x, 256)
    eps, eps_0 = torch.randn_like(f), torch.randn_like(f)
    eps_hat = (eps + 0.1 * torch.randn_like(f)).requires_grad_()
    gamma_t = torch.rand(B, device=device).mul(18.3).sub(13.3).requires_grad_()
    dgamma = torch.full((B,), 18.3, device=device, requires_grad=True)
    gamma_0 = torch.full((B,), gamma_0, device=device, requires_grad=True)
    gamma_1 = torch.full((B,), 5.0, device=device, requires_grad=True)
    return dict(x=x, f=f, eps=eps, eps_0=eps_0, eps_hat=eps_hat, gamma_t=gamma_t, dgamma=dgamma,
                gamma_0=gamma_0, gamma_1=gamma_1)


def recon_step(lib, a):
    lib.reconstruction_loss(a["x"], a["eps_0"], a["gamma_0"]).sum().backward()


def vlb_step(lib, a):
    z = lib.diffuse(a["f"], a["eps"], a["gamma_t"])
    eps_hat = a["eps_hat"] + 0 * z  # stands in for model(z_t), so z_t's backward runs too
    diffusion = lib.diffusion_loss(a["eps"], eps_hat, a["dgamma"])
    prior = lib.prior_loss(a["f"], a["gamma_1"])
    recon = lib.reconstruction_loss(a["x"], a["eps_0"], a["gamma_0"])
    (diffusion + prior + recon).sum().backward()


def bytes_moved(which, B, D):
    """Bytes a fused fwd+bwd must touch at least: inputs read (twice) and gradients written."""
    if which == "reconstruction":
        return B * D * (2 * 1 + 2 * 4 + 4)  # x (uint8) and eps_0 read twice, grad eps_0 written
    # diffuse (f, eps, z, grads) + sse (eps_hat, eps, grad) + prior (f) + reconstruction
    return B * D * (3 * 4 + 4 * 4 + 3 * 4 + 4 + 2 * 4 + (2 + 8 + 4))


IMPLEMENTATIONS = ["reference", "reference, compiled", "windowed", "windowed, compiled", "vdm_fast"]


def implementations(which, a):
    """``{name: fwd+bwd callable}`` of one case; the compiled ones compile the whole step."""
    step = recon_step if which == "reconstruction" else vlb_step
    impls = {}
    for name, lib in (("reference", ref), ("windowed", Windowed(windowed_reconstruction_loss))):
        impls[name] = lambda lib=lib: step(lib, a)
        impls[f"{name}, compiled"] = compiled(impls[name])
    impls["vdm_fast"] = lambda: step(ops, a)
    return impls


def run(device, shapes, gamma_0, ref_limit_gb, only):
    out = []
    for B, shape in shapes:
        a = make_inputs(B, shape, device, gamma_0)
        logits_gb = B * shape[0] * shape[1] * shape[2] * 256 * 4 / 1e9
        for which in ("reconstruction", "whole VLB"):
            impls = {k: v for k, v in implementations(which, a).items() if k in only}
            if logits_gb * 4 > ref_limit_gb:  # logits, probabilities and their gradients
                impls = {k: v for k, v in impls.items() if not k.startswith("reference")}
            case = {"term": which, "B": B, "image": "x".join(map(str, shape[1:])) + f"x{shape[0]}"}
            results = measure(impls, device)
            out += rows(case, results)
            if "vdm_fast" in results:
                out[-1]["GB/s"] = f"{bytes_moved(which, B, math.prod(shape)) / results['vdm_fast'].seconds / 1e9:.1f}"
            for row in out[-len(impls):]:
                print(row, flush=True)
    return out


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("which", ["reconstruction", "whole VLB"])
def test_loss_fwd_bwd(benchmark, which, impl):
    """pytest-benchmark front-end (``pytest benchmarks/``): B=128, 32x32x3, CPU."""
    a = make_inputs(128, (3, 32, 32), "cpu", -13.3)
    benchmark.group = f"{which}, B=128, 32x32x3"
    benchmark(recon_step if which == "reconstruction" else vlb_step, ref if impl == "reference" else ops, a)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--all-shapes", action="store_true", help=f"all of {SHAPES} (default: the first)")
    parser.add_argument("--gamma-0", type=float, default=-10.0, help="gamma_0 of the reconstruction loss")
    parser.add_argument("--ref-limit-gb", type=float, default=float(os.environ.get("REF_LIMIT_GB", 12)))
    parser.add_argument("--impls", nargs="+", default=IMPLEMENTATIONS, choices=IMPLEMENTATIONS,
                        help="the implementations to run (default: all)")
    args = parser.parse_args()
    out = run(args.device, SHAPES if args.all_shapes else SHAPES[:1], args.gamma_0, args.ref_limit_gb, args.impls)
    print()
    print(header(f"Loss terms, forward + backward (fp32, gamma_0 = {args.gamma_0:g})", args.device))
    print(table(out, ["term", "B", "image", "implementation", "ms", "vdm_fast speed-up", "peak MiB", "first call s",
                     "GB/s"]))
    print("GB/s: the least bytes a fused forward+backward must move, over its time (copy bandwidth above).")


if __name__ == "__main__":
    main()
