"""Loss family: reference vs fused, forward + backward, in one run.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--quick]

Prints a markdown table: milliseconds per forward+backward for the reference (plain PyTorch,
``vdm_fast.reference.loss``) and the fused ops, their ratio, and the fused ops' effective GB/s.
The reference's reconstruction loss materialises ``[B, D, 256]`` logits; where those would not
fit in memory (over ``--ref-limit-gb``) its column says so instead of swapping the machine.
"""

import argparse
import os

import pytest
import torch

from vdm_fast import ops
from vdm_fast.reference import loss as ref

try:
    from benchmarks.common import header, table, time_fn
except ImportError:  # run as a script from the repository root
    from common import header, table, time_fn

SHAPES = [(128, (3, 32, 32)), (512, (3, 32, 32)), (128, (3, 64, 64)), (512, (3, 64, 64))]


def make_inputs(B, shape, device, gamma_0=-13.3):
    x = torch.randint(0, 256, (B, *shape), device=device, dtype=torch.uint8)
    f = ref.encode(x, 256)
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


def run(device, shapes, ref_limit_gb):
    rows = []
    for B, shape in shapes:
        D = shape[0] * shape[1] * shape[2]
        a = make_inputs(B, shape, device)
        logits_gb = B * D * 256 * 4 / 1e9
        for which, step in (("reconstruction", recon_step), ("whole VLB", vlb_step)):
            fused = time_fn(lambda: step(ops, a), device)
            row = {"term": which, "B": B, "image": "x".join(map(str, shape[1:])) + f"x{shape[0]}",
                   "fused ms": f"{fused * 1e3:.2f}",
                   "fused GB/s": f"{bytes_moved(which, B, D) / fused / 1e9:.1f}"}
            if logits_gb * 4 <= ref_limit_gb:  # logits, probabilities and their gradients
                reference = time_fn(lambda: step(ref, a), device, min_time=0.1, max_reps=5)
                row.update({"reference ms": f"{reference * 1e3:.1f}", "speed-up": f"{reference / fused:.1f}x"})
            else:
                row.update({"reference ms": f"n/a (needs ~{4 * logits_gb:.0f} GB)", "speed-up": "n/a"})
            rows.append(row)
            print(row, flush=True)
    return rows


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("which", ["reconstruction", "whole VLB"])
def test_loss_fwd_bwd(benchmark, which, impl):
    """pytest-benchmark front-end (``pytest benchmarks/``): B=128, 32x32x3, CPU."""
    a = make_inputs(128, (3, 32, 32), "cpu")
    benchmark.group = f"{which}, B=128, 32x32x3"
    benchmark(recon_step if which == "reconstruction" else vlb_step, ref if impl == "reference" else ops, a)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    parser.add_argument("--ref-limit-gb", type=float, default=float(os.environ.get("REF_LIMIT_GB", 12)))
    args = parser.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = run(args.device, shapes, args.ref_limit_gb)
    print()
    print(header("Loss terms, forward + backward (fp32, gamma_0 = -13.3)", args.device))
    print(table(rows, ["term", "B", "image", "reference ms", "fused ms", "speed-up", "fused GB/s"]))


if __name__ == "__main__":
    main()
