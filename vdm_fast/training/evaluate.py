"""Test-set bits per dim of a trained VDM, each with its standard error and number of draws:
``python -m vdm_fast.training.evaluate --ckpt PATH``.

    python -m vdm_fast.training.evaluate --ckpt CKPT                      # the continuous-time bound, 16 draws an image
    python -m vdm_fast.training.evaluate --ckpt CKPT --draws 64           # 64 draws an image, averaged
    python -m vdm_fast.training.evaluate --ckpt CKPT --T 1000 --every-step  # the T-step bound summed over all steps
    python -m vdm_fast.training.evaluate --ckpt CKPT --likelihood ode     # the probability-flow ODE (vdm_fast.likelihood)
    torchrun --nproc_per_node N -m vdm_fast.training.evaluate ...          # the test set split over N processes

``--likelihood bound`` (the default) estimates the variational bound of ``VDM.forward``: per draw
one time ``t`` (an image's ``K`` draws stratified: ``u + k / K`` mod 1 for one uniform ``u``; on the
T-step grid with ``--T``), one noise for ``z_t`` and one for ``z_0``; ``--every-step`` sums the T-step bound's diffusion loss over all T steps instead (one
noise draw each). ``--likelihood ode`` bounds ``-log p(x)`` through the probability-flow ODE with
``q(z_0 | x)`` as the dequantisation (one draw of ``z_0`` an image per ``--draws``; the trace exact
or Hutchinson's, torchdiffeq's adaptive solvers); it needs the ``likelihood`` extra (torchdiffeq).

The figure printed is the mean over images of each image's mean over its ``--draws`` draws,
``+-`` the standard error of that mean over images (which holds the images' spread as well as
the Monte-Carlo noise; with two or more draws the Monte-Carlo share alone, at most, is printed
beside it).

Every draw is seeded by ``(seed, the image's index in the test set, the draw)``, never by a
running generator, so an image gets the same draws in any batch, and N processes under torchrun
(gloo on the CPU, NCCL on GPUs; the test set's batches dealt out in turn) compute what one
process computes, up to the order of float sums. The trainer's final test bpd is this
command's default figure (``BOUND_DRAWS`` draws an image).
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from vdm_fast.extras import require

require("train")  # a one-line message, not an ImportError, without the extra

from tqdm import tqdm

from vdm_fast.training import data as datasets
from vdm_fast.io import load_model_or_exit
from vdm_fast.training.distributed import Distributed
from vdm_fast.diffusion.draws import IMAGE_BOUND, IMAGE_ODE, IMAGE_TIMES, image_generator

LIKELIHOODS = ("bound", "ode")
# Draws an image of the continuous-time bound where nobody says (the trainer's final report, the
# evaluate command): one draw of it spreads by ~2 bits per dim an image, and a forward pass is
# cheap next to training.
BOUND_DRAWS = 16


# --- the draws of one image, by its index -------------------------------------------------------

def bound_draw(model, x: torch.Tensor, labels: Optional[torch.Tensor], indices, draw: int, draws: int = 1,
               T: int = 0, every_step: bool = False, seed: int = 0) -> torch.Tensor:
    """Draw ``draw`` of ``draws`` of the bound (bits per dim, float64 ``[B]``) of each image of ``x``,
    seeded by the images' ``indices``: ``eps`` and ``eps_0`` from ``image_generator(seed, index,
    draw, 0)``, and the time ``t = (u + draw / draws) mod 1`` with one uniform ``u`` an image from
    ``image_generator(seed, index, 0, 2)``: an image's draws are antithetic (stratified) in time, as
    the trainer's batches are, which is what makes a few draws an image a low-noise figure.
    ``every_step`` (``T > 0``): ``eps_0`` then one ``eps`` per step ``1 .. T`` from the first
    generator, and the diffusion loss summed over every step."""
    dtype, shape = model.dtype, tuple(x.shape[1:])
    gens = [image_generator(seed, int(i), draw, IMAGE_BOUND) for i in indices]
    device = x.device
    if not every_step:
        u = torch.cat([torch.rand(1, generator=image_generator(seed, int(i), 0, IMAGE_TIMES), dtype=dtype)
                       for i in indices])
        t = torch.remainder(u + draw / draws, 1.0)
        eps = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens])
        eps_0 = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens])
        return model(x, T=T, t=t.to(device), eps=eps.to(device), eps_0=eps_0.to(device), labels=labels).bpd.double()
    if T < 1:
        raise ValueError("every_step needs the T-step bound (T >= 1)")
    eps_0 = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]).to(device)
    nats = None
    for step in range(1, T + 1):
        eps = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]).to(device)
        # A time inside step `step`'s interval ((step - 1) / T, step / T], which VDM.forward puts
        # on the grid point step / T (a time of exactly step / T could round up past it).
        t = torch.full((len(x),), (step - 0.5) / T, dtype=dtype, device=device)
        out = model(x, T=T, t=t, eps=eps, eps_0=eps_0, labels=labels)
        # forward's T-step diffusion loss is T times the step's term (one step drawn of T)
        term = out.diffusion.double() / T
        nats = (out.reconstruction.double() + out.prior.double() + term) if nats is None else nats + term
    return nats / (math.prod(shape) * math.log(2.0))


def ode_draw(model, x: torch.Tensor, labels: Optional[torch.Tensor], indices, draw: int, seed: int = 0,
             trace: Optional[str] = None, probes: int = 1, probe_kind: str = "rademacher", **solver):
    """One draw of the ODE bound (``vdm_fast.likelihood.ode_bound``) of each image: ``eps_0`` (for
    ``z_0 ~ q(z_0 | x)``) and, for Hutchinson's trace, ``probes`` probes, in that order, from
    ``image_generator(seed, index, draw, 1)``. Returns ``(bpd float64 [B], nfe)``."""
    from vdm_fast import likelihood

    dtype, shape = model.dtype, tuple(x.shape[1:])
    trace = likelihood.default_trace(math.prod(shape)) if trace is None else trace
    gens = [image_generator(seed, int(i), draw, IMAGE_ODE) for i in indices]
    eps_0 = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]).to(x.device)
    v = None
    if trace == "hutchinson":
        v = torch.stack([likelihood.draw_probes(g, probes, shape, probe_kind, dtype) for g in gens], dim=1)
    out = likelihood.ode_bound(model, x, eps_0, labels, trace=trace, probes=v, **solver)
    return out.bpd.double(), out.nfe


# --- statistics and processes -------------------------------------------------------------------

def summarize(values: torch.Tensor) -> dict:
    """The mean of ``values [N images, K draws]`` and its standard errors: ``se`` over images of
    the per-image means (NaN for one image; the images' draws are independent of one another, so
    this is the error of the figure as an estimate over images like these), and ``mc_se``, the
    Monte-Carlo share (the draws' spread within an image, ``sqrt(mean_i var_i / K / N)``, as if
    the draws were independent: for the bound's stratified times an upper bound; None for one
    draw)."""
    values = values.double()
    N, K = values.shape
    per_image = values.mean(dim=1)
    se = (per_image.std(unbiased=True) / math.sqrt(N)).item() if N > 1 else math.nan
    mc_se = math.sqrt(values.var(dim=1, unbiased=True).mean().item() / (K * N)) if K > 1 else None
    return {"bpd": per_image.mean().item(), "se": se, "mc_se": mc_se, "images": N, "draws": K,
            "per_image": per_image.tolist()}


def evaluate(model, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *, likelihood: str = "bound",
             batch_size: int = 64, max_batches: int = 0, draws: int = 1, T: int = 0, every_step: bool = False,
             seed: int = 0, device="cpu", job: Optional[Distributed] = None, progress: bool = False, trace=None,
             probes: int = 1, probe_kind: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
             method: str = "dopri5") -> dict:
    """The test figure of ``model`` on ``images`` (``summarize``'s dict, plus ``wall_s`` and, for
    the ODE, the solver's ``nfe`` per solve of a batch's draw): batches of ``batch_size`` in the
    test set's order (the first ``max_batches``; 0: all), ``draws`` draws an image, dealt out over
    ``job``'s processes (default: this process alone). ``likelihood``: ``"bound"`` (``T``, ``every_step``) or ``"ode"``
    (``trace``, ``probes``, ``probe_kind``, ``rtol``, ``atol``, ``method``)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if draws < 1 or batch_size < 1:
        raise ValueError(f"draws and batch_size must be >= 1, got {draws} and {batch_size}")
    if likelihood == "ode" and (T or every_step):
        raise ValueError("the ODE likelihood is a continuous-time figure: T and every_step are the bound's")
    if every_step and T < 1:
        raise ValueError("every_step sums the T-step bound over its steps: it needs T >= 1")
    job = job or Distributed.alone()
    device = torch.device(device)
    n_batches = math.ceil(len(images) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    N = min(len(images), n_batches * batch_size)
    values = torch.zeros(N, draws, dtype=torch.float64)
    nfe = torch.zeros(n_batches, draws, dtype=torch.float64)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    # The batches dealt out over the processes in turn, every draw of a batch on one process.
    mine = [(b, k) for b in range(job.rank, n_batches, job.world) for k in range(draws)]
    what = "ODE" if likelihood == "ode" else (f"T={T}" if T else "continuous") + (", every step" if every_step else "")
    try:
        for b, k in tqdm(mine, desc=f"test bpd ({what})", disable=not (progress and job.main), leave=False):
            lo, hi = b * batch_size, min(N, (b + 1) * batch_size)
            x = images[lo:hi].to(device)
            y = labels[lo:hi].to(device) if labels is not None else None
            indices = range(lo, hi)
            if likelihood == "bound":
                with torch.no_grad():
                    values[lo:hi, k] = bound_draw(model, x, y, indices, k, draws, T, every_step, seed).cpu()
            else:
                bpd, n = ode_draw(model, x, y, indices, k, seed, trace, probes, probe_kind,
                                  rtol=rtol, atol=atol, method=method)
                values[lo:hi, k], nfe[b, k] = bpd.cpu(), n
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    values, nfe = job.sum(values), job.sum(nfe)
    result = summarize(values)
    result["wall_s"] = job.max(elapsed)
    result["processes"] = job.world
    if likelihood == "ode":
        counts = nfe.reshape(-1)
        result["nfe"] = {"mean": counts.mean().item(), "min": int(counts.min()), "max": int(counts.max()),
                         "solves": counts.numel(), "total": int(counts.sum())}
    return result


def _pm(result: dict) -> str:
    se = "n/a (one image)" if math.isnan(result["se"]) else f"{result['se']:.4f}"
    text = (f"{result['bpd']:.4f} +- {se} (standard error over {result['images']} images of the mean of "
            f"{result['draws']} draw{'s' if result['draws'] > 1 else ''} each")
    if result["mc_se"] is not None:
        text += f"; Monte-Carlo share at most +- {result['mc_se']:.4f}"
    return text + ")"


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint.pt of a training run, or a folder written by vdm-fast export or vdm-fast convert")
    parser.add_argument("--likelihood", choices=LIKELIHOODS, default="bound",
                        help="bound: the variational bound; ode: the probability-flow ODE with variational "
                             "dequantisation (needs torchdiffeq: pip install 'vdm_fast[likelihood]'); default: bound")
    parser.add_argument("--T", type=int, default=0, help="the bound: 0 for continuous time, else T steps")
    parser.add_argument("--every-step", action="store_true",
                        help="the bound with --T: sum the diffusion loss over all T steps (one noise each) "
                             "instead of one random step")
    parser.add_argument("--draws", type=int, default=None,
                        help=f"Monte-Carlo draws per image, averaged (default: {BOUND_DRAWS} for the bound, stratified in "
                             "time; 1 for the ODE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws, with each image's index (default: 0)")
    parser.add_argument("--batches", type=int, default=0, help="test batches to use, from the first (0: all)")
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (0: the run's batch size)")
    ode = parser.add_argument_group("the ODE likelihood (--likelihood ode)")
    ode.add_argument("--trace", choices=("exact", "hutchinson"), default=None,
                     help="the divergence's trace (default: exact for at most 256 dims per image, else hutchinson)")
    ode.add_argument("--probes", type=int, default=1, help="Hutchinson probes per image (default: 1)")
    ode.add_argument("--probe-dist", choices=("rademacher", "gaussian"), default="rademacher",
                     help="Hutchinson probes' distribution (default: rademacher)")
    ode.add_argument("--rtol", type=float, default=1e-5, help="the solver's relative tolerance (default: 1e-5)")
    ode.add_argument("--atol", type=float, default=1e-5, help="the solver's absolute tolerance (default: 1e-5)")
    ode.add_argument("--method", default="dopri5", help="torchdiffeq adaptive solver: dopri5, dopri8, bosh3, "
                     "fehlberg2 or adaptive_heun (default: dopri5)")
    parser.add_argument("--json", default=None, help="also write the result (with each image's mean) to this file")
    parser.add_argument("--data-dir", default=None, help="dataset location, if moved since training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.draws is None:
        args.draws = BOUND_DRAWS if args.likelihood == "bound" else 1
    for name in ("draws", "probes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.T < 0 or args.batch_size < 0 or args.batches < 0:
        parser.error("--T, --batch-size and --batches must be >= 0")
    if args.every_step and not args.T:
        parser.error("--every-step sums the T-step bound over its steps: give --T N")
    if args.likelihood == "ode":
        if args.T or args.every_step:
            parser.error("--likelihood ode is continuous-time: --T and --every-step are the bound's")
        from vdm_fast import likelihood as lik

        if args.method not in lik.METHODS:
            parser.error(f"--method must be one of torchdiffeq's adaptive solvers: {', '.join(lik.METHODS)}")
        if not (args.rtol > 0 and args.atol > 0):
            parser.error("--rtol and --atol must be > 0")
        require("likelihood")
    model, cfg, state = load_model_or_exit(args.ckpt)
    try:
        ds = datasets.load(cfg.data, args.data_dir or cfg.data_dir)
    except datasets.DataError as err:
        raise SystemExit(f"error: {err} (pass --data-dir if the data moved)")
    if ds.vocab_size != model.vocab_size or ds.image_shape != model.image_shape:
        raise SystemExit(f"error: {args.ckpt} models {model.vocab_size}-level images of shape {model.image_shape}, "
                         f"but its dataset {cfg.data} holds {ds.vocab_size}-level images of shape {ds.image_shape}")
    device = torch.device(args.device)
    job = Distributed(device.type)
    if device.type == "cuda" and job.world > 1 and device.index is None:
        device = torch.device("cuda", job.local_rank)  # torchrun: one GPU a process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        model.to(device)
        result = evaluate(model, ds.test.images, ds.test.labels if model.num_classes else None,
                          likelihood=args.likelihood, batch_size=args.batch_size or cfg.batch_size,
                          max_batches=args.batches, draws=args.draws, T=args.T, every_step=args.every_step,
                          seed=args.seed, device=device, job=job, progress=True, trace=args.trace, probes=args.probes,
                          probe_kind=args.probe_dist, rtol=args.rtol, atol=args.atol, method=args.method)
        if job.main:
            baseline = datasets.histogram_bpd(ds.train.images, ds.test.images, ds.vocab_size)
            if args.likelihood == "bound":
                what = f"{'continuous-time' if not args.T else f'T={args.T}'} bound"
                what += ", summed over every step" if args.every_step else ""
            else:
                from vdm_fast import likelihood as lik

                trace = args.trace or lik.default_trace(math.prod(model.image_shape))
                probes = f", {args.probes} {args.probe_dist} probe{'s' if args.probes > 1 else ''}"
                n = result["nfe"]
                what = (f"probability-flow ODE, {args.method} rtol {args.rtol:g} atol {args.atol:g}, {trace} trace"
                        f"{probes if trace == 'hutchinson' else ''}; "
                        f"NFE {n['mean']:.1f} per solve (min {n['min']}, max {n['max']}, {n['solves']} solves)")
            procs = f", {job.world} processes" if job.world > 1 else ""
            print(f"step {state['step']}: test bpd {_pm(result)} [{what}; EMA weights; {result['wall_s']:.1f} s"
                  f"{procs}]")
            print(f"per-pixel histogram baseline {baseline:.4f} (exact: no Monte Carlo)")
            if args.json:
                record = {"step": state["step"], "likelihood": args.likelihood, "T": args.T,
                          "every_step": args.every_step, "seed": args.seed, "histogram_bpd": baseline, **result}
                if args.likelihood == "ode":
                    record.update(trace=trace, rtol=args.rtol, atol=args.atol, method=args.method,
                                  probes=args.probes, probe_dist=args.probe_dist)
                Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        job.close()


if __name__ == "__main__":
    main()
