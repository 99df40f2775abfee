"""Host cost per call: every public op on tiny tensors beside the plain PyTorch it replaces and
beside the reference backend, and the CIFAR-10 U-Net's forward + backward, fused against the
reference and against ``torch.compile`` of each, and the floor any GroupNorm+SiLU kernel can reach
there: the reference's step with every GroupNorm+SiLU free (``without_group_norms``).

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--rounds N] [--json PATH]
                                        [--unet-layers L] [--no-compile] [--skip-unet]

What is timed is the host: one thread (``torch.set_num_threads(1)``), a loop of calls with
nothing else in it; on CUDA the loop only launches, and ``torch.cuda.synchronize`` runs after
the clock stops (a loop long enough to fill the launch queue would measure the GPU: the loops
here stay under a few hundred launches). On a CPU the host's time is the kernels' time too, so
the kernels' own work counts there.

Implementations of each op, each on the same inputs:
- ``vdm_fast``: the public op (``vdm_fast.ops``) as it dispatches by default;
- ``plain torch``: the one-line PyTorch expression the op stands for (``-`` where there is none);
- ``reference``: the public op under ``vdm_fast.backend.use("reference")`` (the switch is entered
  once around a timing loop, not per call).

"forward" passes inputs that need no gradient; "forward+backward" passes leaves that need one
and takes ``torch.autograd.grad`` of the output's sum (no ``.grad`` accumulates). Every round
times every implementation of every case once, round after round (interleaved, so a shared
machine's drifting speed falls on all alike); the table gives each median over the rounds, in
microseconds (U-Net: milliseconds), and each ratio as the median over rounds of the two
implementations' times in the same round.

``--json PATH`` also writes every round's figure, for the record.
"""

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vdm_fast import backend, ops
from vdm_fast.diffusion import pixels
from vdm_fast.nn.blocks import AttnBlock, GroupNormSiLU
from vdm_fast.nn.unet import ScoreUNet
from vdm_fast.reference import attention as ref_attention
from vdm_fast.reference import loss as ref_loss
from vdm_fast.reference import schedule as ref_schedule

try:
    from benchmarks.common import device_name, sync, table
except ImportError:  # run as a script from the repository root
    from common import device_name, sync, table

IMPLS = ("vdm_fast", "plain torch", "reference")


@dataclass
class Case:
    """One op and pass: implementation name -> a function of no arguments (one call)."""

    op: str
    kind: str  # "forward" or "forward+backward"
    impls: dict
    contexts: dict = field(default_factory=dict)  # implementation name -> a context factory


def host_seconds(fn: Callable, device, calls: int) -> float:
    """Seconds per call of ``fn()`` on the host: a loop of ``calls`` calls, the device synchronised
    before the clock starts and after it stops. The clock is the calling thread's CPU time on a
    CPU (with one thread, the kernels and the autograd engine's CPU work run on it too), so the
    time the scheduler gives other processes on a shared machine is not counted; on CUDA it is
    the wall clock of the launch loop."""
    clock = time.perf_counter if torch.device(device).type == "cuda" else time.thread_time
    sync(device)
    start = clock()
    for _ in range(calls):
        fn()
    elapsed = clock() - start
    sync(device)
    return elapsed / calls


def _cases(label, make, vdm, plain=None) -> list:
    """The forward and the forward + backward case of one op. ``make(leaf)`` returns the call's
    arguments, ``leaf(t)`` marking the tensors to differentiate (for the forward, ``t`` as it
    is); ``vdm(*args)`` calls the op and ``plain(*args)`` the plain PyTorch it stands for, each
    returning one tensor (the sum of the outputs where there are several)."""
    cases = []
    for kind in ("forward", "forward+backward"):
        wants = kind == "forward+backward"
        args = make(lambda t: t.detach().clone().requires_grad_(wants))
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        impls = {"vdm_fast": vdm, "plain torch": plain, "reference": vdm}
        impls = {name: _call(fn, args, leaves if wants else None) for name, fn in impls.items() if fn is not None}
        cases.append(Case(label, kind, impls, {"reference": lambda: backend.use("reference")}))
    return cases


def _call(fn, args, leaves):
    """One call of ``fn(*args)``; with ``leaves``, its forward and the gradients of its sum."""
    if leaves is None:
        return lambda: fn(*args)
    return lambda: torch.autograd.grad(fn(*args).sum(), leaves, allow_unused=True)


def _total(outputs):
    """The sum of an op's several outputs, as one tensor to differentiate."""
    return sum(o.sum() for o in outputs)


def op_cases(device) -> list:
    """Every public op on tiny tensors, forward and forward + backward."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    B, image, V = 2, (3, 4, 4), 256
    x_int = torch.randint(0, V, (B, *image), generator=g).to(device)
    f = pixels.encode(x_int, V)
    eps, eps_hat, eps_0 = randn(B, *image), randn(B, *image), randn(B, *image)
    gamma = torch.tensor([-3.0, 2.0], device=device)
    dgamma = torch.tensor([18.3, 18.3], device=device)
    # GroupNorm + SiLU on a U-Net-like activation, plain and with the conditioning add.
    x, w, b, c = randn(2, 64, 4, 4), 1 + randn(64, scale=0.1), randn(64, scale=0.1), randn(2, 64)
    cases = _cases("group_norm_silu", lambda leaf: (leaf(x), leaf(w), leaf(b)),
                   lambda x, w, b: ops.group_norm_silu(x, w, b, 32),
                   lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-6)))
    cases += _cases("group_norm_silu (cond)", lambda leaf: (leaf(x), leaf(w), leaf(b), leaf(c)),
                    lambda x, w, b, c: ops.group_norm_silu(x, w, b, 32, cond=c),
                    lambda x, w, b, c: F.silu(F.group_norm(x + c[:, :, None, None], 32, w, b, 1e-6)))
    # The loss terms.
    cases += _cases("diffuse", lambda leaf: (leaf(f), leaf(eps), leaf(gamma)), ops.diffuse,
                    lambda f, e, gm: (torch.sigmoid(-gm).sqrt().view(-1, 1, 1, 1) * f
                                      + torch.sigmoid(gm).sqrt().view(-1, 1, 1, 1) * e))
    cases += _cases("diffusion_loss", lambda leaf: (eps, leaf(eps_hat), leaf(dgamma)), ops.diffusion_loss,
                    lambda e, eh, dg: 0.5 * dg * ((e - eh) ** 2).flatten(1).sum(1))
    cases += _cases("diffusion_loss_discrete", lambda leaf: (eps, leaf(eps_hat), leaf(gamma), leaf(gamma - 0.1)),
                    lambda e, eh, gt, gs: ops.diffusion_loss_discrete(e, eh, gt, gs, 100),
                    lambda e, eh, gt, gs: 0.5 * 100 * torch.expm1(gt - gs) * ((e - eh) ** 2).flatten(1).sum(1))
    cases += _cases("prior_loss", lambda leaf: (leaf(f), leaf(gamma + 7)), ops.prior_loss,
                    lambda f, g1: (0.5 * (torch.sigmoid(-g1).view(-1, 1) * f.flatten(1) ** 2
                                          + (torch.sigmoid(g1) - F.logsigmoid(g1) - 1.0).view(-1, 1))).sum(1))
    # The reconstruction loss has no shorter plain form than the reference function itself.
    cases += _cases("reconstruction_loss", lambda leaf: (x_int, leaf(eps_0), leaf(gamma - 10)),
                    ops.reconstruction_loss, ref_loss.reconstruction_loss)
    cases += _cases("encode", lambda leaf: (x_int,), ops.encode, lambda x: (2.0 * x.float() + 1.0) / V - 1.0)[:1]
    cases += _cases("vlb_terms", lambda leaf: (x_int, eps, leaf(eps_hat), eps_0, leaf(gamma), leaf(gamma - 10),
                                               leaf(gamma + 7), leaf(dgamma)),
                    lambda x, e, eh, e0, gt, g0, g1, dg: ops.vlb_terms(x, e, eh, e0, gt, g0, g1, dgamma_dt=dg).bpd)
    # The learned schedule (1024 features, the default): the reference takes gamma' by a double
    # backward, as a user without the fused op would.
    t = torch.rand(B, generator=g).to(device)
    net = [randn(1, 1).abs() + 1, randn(1), randn(1024, 1, scale=0.01), torch.zeros(1024, device=device),
           randn(1, 1024, scale=0.01)]
    cases += _cases("gamma_nnet", lambda leaf: (t, *(leaf(p) for p in net)),
                    lambda *a: _total(ops.gamma_nnet(*a)), lambda *a: _total(ref_schedule.nnet(*a)))
    ends = [torch.tensor([-13.3], device=device), torch.tensor([5.0], device=device)]
    cases += _cases("gamma_nnet_pinned", lambda leaf: (t, *(leaf(p) for p in net + ends)),
                    lambda *a: _total(ops.gamma_nnet_pinned(*a)))
    # The attention block (CPU: the reference's math in float32; CUDA: the Triton kernels).
    xa = randn(2, 64, 4, 4)
    attn = [1 + randn(64, scale=0.1), randn(64, scale=0.1), randn(192, 64, scale=0.1), randn(192, scale=0.1),
            randn(64, 64, scale=0.1), randn(64, scale=0.1)]
    cases += _cases("attention_block", lambda leaf: (leaf(xa), *(leaf(p) for p in attn)), ops.attention_block,
                    ref_attention.attention_block)
    return cases


def registration_cases(device) -> list:
    """GroupNorm + SiLU on the tiny activation through each way ``torch.library`` offers to make
    the C++/Triton kernel functions an op, forward and forward + backward:

    - ``custom_op``: ``@torch.library.custom_op`` with ``register_autograd``;
    - ``define/impl + register_autograd``: the registered ``vdm_fast::group_norm_silu`` called
      directly (``torch.ops``), as every call went before;
    - ``Function -> op``: a ``torch.autograd.Function`` whose forward calls that op;
    - ``eager direct`` (what vdm_fast runs): the kernel function itself, inside an
      ``autograd.Function`` when a gradient is wanted (``vdm_fast.ops._library.KernelOp``).
    All run the same kernel functions and backward formula; plain torch is the yardstick."""
    from vdm_fast.ops import norm as ops_norm

    kernel = ops_norm._group_norm_silu.kernels[torch.device(device).type]
    backward_kernel = ops_norm._group_norm_silu_backward.kernels[torch.device(device).type]
    registered = torch.ops.vdm_fast.group_norm_silu.default

    @torch.library.custom_op("vdm_fast_bench::group_norm_silu", mutates_args=())
    def custom(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cond: Optional[torch.Tensor],
               num_groups: int, eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return kernel(x, weight, bias, cond, num_groups, eps, silu)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2], output[1], output[2])
        ctx.num_groups, ctx.silu = inputs[4], inputs[6]

    def backward(ctx, dy, _dmean, _drstd):
        x, w, b, mean, rstd = ctx.saved_tensors
        dx, dw, db, _ = backward_kernel(dy, x, w, b, None, mean, rstd, ctx.num_groups, ctx.silu)
        return dx, dw, db, None, None, None, None

    custom.register_autograd(backward, setup_context=setup)

    class FunctionToOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y, mean, rstd = registered(x, w, b, None, 32, 1e-6, True)
            ctx.save_for_backward(x, w, b, mean, rstd)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, b, mean, rstd = ctx.saved_tensors
            dx, dw, db, _ = torch.ops.vdm_fast.group_norm_silu_backward.default(dy, x, w, b, None, mean, rstd, 32,
                                                                                 True)
            return dx, dw, db

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(2, 64, 4, 4, generator=g).to(device), 1 + 0.1 * torch.randn(64, generator=g).to(device),
               0.1 * torch.randn(64, generator=g).to(device))
    ways = {"plain torch": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-6)),
            "custom_op": lambda x, w, b: custom(x, w, b, None, 32, 1e-6, True)[0],
            "define/impl + register_autograd": lambda x, w, b: registered(x, w, b, None, 32, 1e-6, True)[0],
            "Function -> op": FunctionToOp.apply,
            "eager direct": lambda x, w, b: ops_norm._group_norm_silu(x, w, b, None, 32, 1e-6, True)[0]}
    cases = []
    for kind in ("forward", "forward+backward"):
        wants = kind == "forward+backward"
        args = [t.detach().clone().requires_grad_(wants) for t in (x, w, b)]
        cases.append(Case("group_norm_silu", kind, {name: _call(fn, args, args if wants else None)
                                                    for name, fn in ways.items()}))
    return cases


FLOOR = "GroupNorm+SiLU free (floor)"


class _ConditioningOnly(torch.nn.Module):
    """A GroupNorm+SiLU that costs nothing: its input (plus the conditioning it adds), unnormalised."""

    def forward(self, x, cond=None):
        return x if cond is None else x + cond[:, :, None, None]


def without_group_norms(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` with every ``GroupNormSiLU`` module replaced by ``_ConditioningOnly``
    (the attention block's own GroupNorm, inside its fused op, stays). The convolutions' host
    time does not depend on the values, so the copy's step time is what the step would cost
    with a GroupNorm+SiLU of zero cost."""
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        if isinstance(module, AttnBlock):
            continue
        for name, child in module.named_children():
            if isinstance(child, GroupNormSiLU):
                setattr(module, name, _ConditioningOnly())
    return net


def unet_cases(device, layers: int, compile_too: bool) -> list:
    """The CIFAR-10 score network (128 channels, ``layers`` ResNet blocks down) on a 1x3x2x2
    input, forward + backward (gradients set to None before each), fused and reference, eager
    and compiled (each its own copy of one initial network)."""
    torch.manual_seed(0)
    net = ScoreUNet(in_channels=3, n_embd=128, n_layer=layers).to(device)
    z, gamma = torch.randn(1, 3, 2, 2, device=device), torch.tensor([-3.0], device=device)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(z, gamma).sum().backward()
        return run

    impls, contexts = {}, {}
    for name, choice in (("vdm_fast", "auto"), ("reference", "reference")):
        impls[name] = step(copy.deepcopy(net))
        contexts[name] = (lambda choice=choice: backend.use(choice))
        if compile_too:
            impls[f"{name}, compiled"] = step(torch.compile(copy.deepcopy(net), fullgraph=True))
            contexts[f"{name}, compiled"] = contexts[name]
    # The floor a GroupNorm+SiLU kernel can reach: the step with every one of them free.
    # Under the reference backend, as the reference's step, so the two differ by the GroupNorms alone.
    impls[FLOOR] = step(without_group_norms(net))
    contexts[FLOOR] = contexts["reference"]
    return [Case(f"ScoreUNet(128, {layers}) on 1x3x2x2", "forward+backward", impls, contexts)]


def measure(cases, device, rounds: int, target_s: float) -> dict:
    """``{(case index, implementation): [seconds per call, one per round]}`` and the first
    call's seconds of each (a compiled function's compile time), rounds interleaved."""
    first, calls = {}, {}
    for i, case in enumerate(cases):
        for name, fn in case.impls.items():
            with case.contexts.get(name, contextlib.nullcontext)():
                start = time.perf_counter()
                fn()
                sync(device)
                first[i, name] = time.perf_counter() - start
                per_call = max(host_seconds(fn, device, 3), 1e-7)
            # enough calls for target_s a round, at most 200 (CUDA: below the launch queue's depth)
            calls[i, name] = max(1, min(200 if torch.device(device).type == "cuda" else 100_000,
                                        math.ceil(target_s / per_call)))
    times = {key: [] for key in calls}
    for r in range(rounds):
        for i, case in enumerate(cases):
            for name, fn in case.impls.items():
                with case.contexts.get(name, contextlib.nullcontext)():
                    times[i, name].append(host_seconds(fn, device, calls[i, name]))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return times, first


def paired_ratio(times, i, name, base) -> float:
    """The median over rounds of ``name``'s time over ``base``'s in the same round: the two ran
    back to back, so a drift of the machine's speed between rounds cancels."""
    return statistics.median(a / b for a, b in zip(times[i, name], times[i, base]))


def op_rows(cases, times) -> list:
    rows = []
    for i, case in enumerate(cases):
        us = {name: statistics.median(times[i, name]) * 1e6 for name in case.impls}
        row = {"op": case.op, "pass": case.kind}
        for name in IMPLS:
            row[name] = f"{us[name]:.1f}" if name in us else "-"
        for base in ("plain torch", "reference"):
            row[f"vdm_fast / {base}"] = f"{paired_ratio(times, i, 'vdm_fast', base):.2f}" if base in us else "-"
        rows.append(row)
    return rows


def unet_rows(cases, times, first) -> list:
    rows = []
    for i, case in enumerate(cases):
        ms = {name: statistics.median(times[i, name]) * 1e3 for name in case.impls}
        for name in case.impls:
            rows.append({"model": case.op, "implementation": name, "ms": f"{ms[name]:.2f}",
                         "/ reference": f"{paired_ratio(times, i, name, 'reference'):.2f}",
                         "first call s": f"{first[i, name]:.1f}"})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (the median is reported)")
    parser.add_argument("--target-ms", type=float, default=5.0, help="length of one op's timing loop")
    parser.add_argument("--unet-layers", type=int, default=32, help="ResNet blocks down (32: the CIFAR-10 model)")
    parser.add_argument("--unet-rounds", type=int, default=9)
    parser.add_argument("--unet-target-s", type=float, default=1.0, help="length of one U-Net timing loop")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd U-Nets")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--ops", nargs="+", help="only these ops (default: every one)")
    parser.add_argument("--registrations", action="store_true",
                        help="also time group_norm_silu through each torch.library registration")
    parser.add_argument("--json", help="also write every round's figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    where = device_name(device)
    print(f"{time.strftime('%Y-%m-%d')} · {where} · torch {torch.__version__} · "
          f"{backend.describe('norm', device, torch.float32)} GroupNorm")
    record = {"device": where, "torch": torch.__version__, "ops": [], "unet": []}
    if not args.skip_ops:
        cases = [c for c in op_cases(device) if not args.ops or c.op.split()[0] in args.ops]
        times, _ = measure(cases, device, args.rounds, args.target_ms / 1e3)
        rows = op_rows(cases, times)
        print("\nHost microseconds per call (median of interleaved rounds):\n")
        print(table(rows, ["op", "pass", *IMPLS, "vdm_fast / plain torch", "vdm_fast / reference"]))
        record["ops"] = [dict(row, rounds_us=[t * 1e6 for t in times[i, "vdm_fast"]]) for i, row in enumerate(rows)]
    if args.registrations:
        cases = registration_cases(device)
        times, _ = measure(cases, device, args.rounds, args.target_ms / 1e3)
        ways = list(cases[0].impls)
        rows = [{"pass": case.kind, **{name: f"{statistics.median(times[i, name]) * 1e6:.1f}" for name in ways},
                 **{f"{name} / plain": f"{paired_ratio(times, i, name, 'plain torch'):.2f}" for name in ways[1:]}}
                for i, case in enumerate(cases)]
        print("\ngroup_norm_silu [2, 64, 4, 4] by registration, host microseconds per call:\n")
        print(table(rows, ["pass", *ways, *(f"{name} / plain" for name in ways[1:])]))
        record["registrations"] = rows
    if not args.skip_unet:
        cases = unet_cases(device, args.unet_layers, not args.no_compile)
        times, first = measure(cases, device, args.unet_rounds, args.unet_target_s)
        rows = unet_rows(cases, times, first)
        print("\nU-Net forward + backward, host milliseconds (median of interleaved rounds):\n")
        print(table(rows, ["model", "implementation", "ms", "/ reference", "first call s"]))
        record["unet"] = [dict(row, rounds_ms=[t * 1e3 for t in times[0, row["implementation"]]]) for row in rows]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main()
