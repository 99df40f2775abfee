"""Samples of a trained VDM as a PNG grid or a .npy array: ``python -m vdm_fast.training.sample --ckpt PATH``.

``--sampler ancestral|ddim|dpm-solver|dpm-solver-sde --steps N`` (``--T`` is the same flag, kept for the
ancestral steps; ancestral at 1000 steps is the default and gives today's images), ``--eta``
for ddim, ``--out FILE.npy`` for the integer images themselves (int64 ``[N, C, H, W]``)."""

import argparse

import numpy as np
import torch

from vdm_fast.extras import require

require("train")  # a one-line message, not an ImportError, without the extra

from vdm_fast.io import load_model_or_exit
from vdm_fast.training.images import save_grid
from vdm_fast.samplers import DEFAULT_SPACING, SAMPLERS, SPACINGS, check_sampler, network_evaluations

DEFAULT_STEPS = {"ancestral": 1000, "ddim": 100, "dpm-solver": 20, "dpm-solver-sde": 20}


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.training.sample", description=__doc__)
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint.pt of a training run, or a folder written by vdm-fast export or vdm-fast convert")
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
    model, _, _ = load_model_or_exit(args.ckpt)
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
