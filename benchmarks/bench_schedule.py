"""Monotone noise schedule: autograd reference (gamma' through create_graph, then a double
backward) vs the fused op, gamma and gamma' forward plus the backward of both, in one run.

    python benchmarks/bench_schedule.py [--device cpu|cuda] [--impl triton|cuda]

n = 1024 hidden units, B = 128, 1024 and 65536 times. Prints a markdown table (microseconds per
forward+backward, medians over five interleaved rounds of reference and fused, ratio). On CUDA it adds the fused step captured in a CUDA graph and replayed:
the device time of its kernels without Python's per-launch cost, which at B=128 dominates eager.
"""

import argparse
import os

import pytest
import torch

from vdm_fast import ops
from vdm_fast.reference import schedule as ref

try:
    from benchmarks.common import header, table, time_fn, time_interleaved
except ImportError:  # run as a script from the repository root
    from common import header, table, time_fn, time_interleaved

SIZES = (128, 1024, 65536)


def make_inputs(B, device, n=1024):
    params = [torch.randn(1, 1) * 5, torch.randn(1), torch.randn(n, 1), torch.randn(n), torch.randn(1, n)]
    params = [p.to(device).requires_grad_() for p in params]
    t = torch.rand(B, device=device)
    return t, params, torch.randn(B, device=device), torch.randn(B, device=device)


def step(fn, t, params, gg, gd):
    gamma, dgamma = fn(t, *params)
    (gamma * gg + dgamma * gd).sum().backward()


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("B", [128, 1024])
def test_schedule_fwd_bwd(benchmark, B, impl):
    """pytest-benchmark front-end (``pytest benchmarks/``), CPU."""
    benchmark.group = f"schedule, B={B}"
    benchmark(step, ref.nnet if impl == "reference" else ops.gamma_nnet, *make_inputs(B, "cpu"))


def cuda_graph_replay(fn, device):
    """``fn`` (forward and backward) captured in a CUDA graph after a warm-up on a side stream, as
    torch's whole-network capture does; returns the replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", choices=("triton", "cuda"), default=None,
                        help="CUDA kernels to time (sets VDM_FAST_CUDA_IMPL)")
    args = parser.parse_args()
    if args.impl:
        os.environ["VDM_FAST_CUDA_IMPL"] = args.impl
    rows = []
    for B in SIZES:
        inputs = make_inputs(B, args.device)
        timed = time_interleaved({"reference": lambda: step(ref.nnet, *inputs),
                                  "fused": lambda: step(ops.gamma_nnet, *inputs)}, args.device,
                                 rounds=5 if B <= 1024 else 1)
        reference, fused = timed["reference"], timed["fused"]
        rows.append({"B": B, "reference us": f"{reference * 1e6:.0f}", "fused us": f"{fused * 1e6:.0f}",
                     "speed-up": f"{reference / fused:.1f}x"})
        if args.device.startswith("cuda"):
            try:
                graphed = time_fn(cuda_graph_replay(lambda: step(ops.gamma_nnet, *inputs), args.device), args.device)
                rows[-1]["fused, CUDA graph us"] = f"{graphed * 1e6:.1f}"
            except RuntimeError as err:  # the eager columns stand on their own
                rows[-1]["fused, CUDA graph us"] = f"failed: {err}".splitlines()[0][:80]
        print(rows[-1], flush=True)
    impl = f", {os.environ.get('VDM_FAST_CUDA_IMPL', 'triton')} kernels" if args.device.startswith("cuda") else ""
    print()
    print(header(f"Monotone schedule (n=1024), gamma + gamma' forward and backward{impl}", args.device))
    columns = ["B", "reference us", "fused us", "speed-up"]
    if args.device.startswith("cuda"):
        columns.append("fused, CUDA graph us")
    print(table(rows, columns))


if __name__ == "__main__":
    main()
