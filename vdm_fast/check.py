"""A self-test of every op on this machine's device: ``python -m vdm_fast.check [--device cuda]``.

Builds nothing. Runs each op of ``vdm_fast.ops`` on small fresh random inputs against its
pure-PyTorch reference in float64, forward and backward, in each dtype the op takes on the
device, and prints one table: the op, the implementation that ran (``vdm_fast.backend``), the
largest error against the tolerance (``vdm_fast.tolerance``), and a quick fused/reference timing. Exits with status 1 if any op is off (or fails), 0 otherwise. Run
it after ``pip install`` on a new machine or GPU.
"""

import argparse
import sys
import time

import torch

import vdm_fast
from vdm_fast import backend, ops
from vdm_fast import reference as ref
from vdm_fast.tolerance import RTOL

# The op family (vdm_fast.backend's unit of choice) of each op checked.
FAMILY = {"reconstruction_loss": "loss", "diffuse": "loss", "diffusion_loss": "loss", "prior_loss": "loss",
          "gamma_nnet": "schedule", "group_norm_silu": "norm", "attention_block": "attention"}


def _cases(device: torch.device):
    """``(op, dtype, inputs, fused(*inputs), reference(*inputs))`` for every op and dtype."""
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    loss_dtypes = (torch.float32, torch.float64)
    for dtype in loss_dtypes:
        B, D = 4, 3 * 8 * 8
        x = torch.randint(0, 256, (B, D), generator=gen, device=device)
        f = ref.loss.encode(x, 256, dtype)
        gamma = torch.rand(B, generator=gen, device=device, dtype=dtype) * 5 - 8
        yield ("reconstruction_loss", dtype, [randn(B, D, dtype=dtype), gamma.clone()],
               lambda e, g, x=x: ops.reconstruction_loss(x, e, g), lambda e, g, x=x: ref.loss.reconstruction_loss(x, e, g))
        yield ("diffuse", dtype, [f.clone(), randn(B, D, dtype=dtype), gamma.clone()], ops.diffuse, ref.loss.diffuse)
        yield ("diffusion_loss", dtype, [randn(B, D, dtype=dtype), randn(B, D, dtype=dtype), gamma.exp()],
               ops.diffusion_loss, ref.loss.diffusion_loss)
        yield ("prior_loss", dtype, [f.clone(), gamma + 10], ops.prior_loss, ref.loss.prior_loss)
        n = 64
        params = [randn(1, 1, dtype=dtype) + 18, randn(1, dtype=dtype) - 13, randn(n, 1, dtype=dtype),
                  randn(n, dtype=dtype), randn(1, n, dtype=dtype)]
        t = torch.rand(B, generator=gen, device=device, dtype=dtype)
        yield ("gamma_nnet", dtype, [t, *params], ops.gamma_nnet, ref.schedule.nnet)
    norm_dtypes = (torch.float32, torch.float64) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    for dtype in norm_dtypes:
        C = 64
        x = randn(2, C, 8, 8, dtype=dtype)
        w, b = 1 + 0.1 * randn(C, dtype=dtype), 0.1 * randn(C, dtype=dtype)
        yield ("group_norm_silu", dtype, [x, w, b], lambda x, w, b: ops.group_norm_silu(x, w, b),
               lambda x, w, b: ref.norm.group_norm_silu(x, w, b))
        weights = [w.clone(), b.clone(), 0.1 * randn(3 * C, C, dtype=dtype), 0.1 * randn(3 * C, dtype=dtype),
                   0.1 * randn(C, C, dtype=dtype), 0.1 * randn(C, dtype=dtype)]
        yield ("attention_block", dtype, [x.clone(), *weights], ops.attention_block, ref.attention.attention_block)


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _max_rel_error(actual, expected) -> float:
    errors = []
    for a, e in zip(actual, expected):
        a, e = a.detach().double(), e.detach().double()
        if a.shape != e.shape or not torch.isfinite(a).all():
            return float("inf")
        errors.append(((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item())
    return max(errors)


def _run(fn, inputs, dtype=None):
    """Forward and backward (a fixed random cotangent per output): outputs and input grads;
    with ``dtype``, on copies of the floating inputs in that dtype."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) if t.is_floating_point()
              else t.detach().clone() for t in inputs]
    outs = _outputs(fn(*leaves))
    gen = torch.Generator(outs[0].device).manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64).to(o.dtype)
                  for o in outs]
    grads = torch.autograd.grad(outs, [t for t in leaves if t.requires_grad], cotangents)
    return outs + list(grads)


def _time(fn, inputs, device, reps: int = 5) -> float:
    def once():
        _run(fn, inputs)

    once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps


def check(device: torch.device, timing: bool = True):
    """Rows ``(op, dtype, implementation, error, tolerance, speed-up, ok, failure)`` for every op
    and dtype."""
    rows = []
    for op, dtype, inputs, fused, reference in _cases(device):
        tol = RTOL[dtype]
        try:
            error = _max_rel_error(_run(fused, inputs), _run(reference, inputs, torch.float64))
            speedup = _time(reference, inputs, device) / _time(fused, inputs, device) if timing else float("nan")
            failure = ""
        except Exception as err:  # a failing op is a row of the table, not a traceback
            error, speedup, failure = float("inf"), float("nan"), f"{type(err).__name__}: {err}"
        rows.append((op, str(dtype).removeprefix("torch."), backend.describe(FAMILY[op], device, dtype), error, tol,
                     speedup, error <= tol, failure))
    return rows


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-timing", action="store_true", help="skip the fused/reference timing")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be cpu or cuda, got {args.device}")
    print(f"vdm_fast self-test on {device}: vdm_fast {vdm_fast.__version__} from {vdm_fast.__path__[0]}, "
          f"torch {torch.__version__}, backend {backend.current()}, build {backend.build_info()}")
    info = backend.build_info()
    if info.get("openmp"):
        threads = info["openmp_max_threads"]
        print(f"C++ CPU kernels: OpenMP, {threads} thread{'s' if threads != 1 else ''}")
    else:
        print("C++ CPU kernels: " + ("without OpenMP, 1 thread" if info["extension"] else "not built (the CPU ops run "
                                     "the reference)"))
    rows = check(device, timing=not args.no_timing)
    print(f"{'op':<20} {'dtype':<9} {'implementation':<36} {'max rel err':>11} {'tolerance':>9} {'ref/fused':>9}  "
          "result")
    for op, dtype, impl, error, tol, speedup, ok, failure in rows:
        print(f"{op:<20} {dtype:<9} {impl:<36} {error:>11.2e} {tol:>9.0e} {speedup:>8.1f}x  "
              f"{'ok' if ok else 'FAIL ' + failure}")
    failed = sum(not r[6] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
