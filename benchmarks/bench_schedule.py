"""Monotone noise schedule: gamma and gamma' forward plus the backward of both, every way to
compute them side by side in one run.

    python benchmarks/bench_schedule.py [--device cpu|cuda]

Implementations, n = 1024 hidden units, B = 128, 1024 and 65536 times:
- ``reference``: ``vdm_fast.reference.schedule.nnet``, gamma' through autograd with
  ``create_graph`` and then a double backward (what the official code does);
- ``lean``: the derivative written out by hand in plain PyTorch (``lean_nnet`` below, one
  backward): the strongest baseline a user writes in an afternoon;
- ``lean, compiled``: ``torch.compile`` of it (``torch.compile`` cannot take the reference's
  double backward: "torch.compile with aot_autograd does not currently support double backward");
- ``vdm_fast``: the fused op.

Prints a markdown table: microseconds per forward+backward (medians over five rounds that time
every implementation in turn), the fused op's speed-up over each, peak memory, and, in a second
table, the fused op's speed-up over ``lean`` in every round. On CUDA it adds the fused step
captured in a CUDA graph and replayed: the device time of its kernels without Python's
per-launch cost, which at B=128 dominates eager.
"""

import argparse

import pytest
import torch

from vdm_fast import ops
from vdm_fast.reference import schedule as ref

try:
    from benchmarks.common import compiled, header, measure, rows, table, time_fn
except ImportError:  # run as a script from the repository root
    from common import compiled, header, measure, rows, table, time_fn

SIZES = (128, 1024, 65536)


def make_inputs(B, device, n=1024):
    params = [torch.randn(1, 1) * 5, torch.randn(1), torch.randn(n, 1), torch.randn(n), torch.randn(1, n)]
    params = [p.to(device).requires_grad_() for p in params]
    t = torch.rand(B, device=device)
    return t, params, torch.randn(B, device=device), torch.randn(B, device=device)


def lean_nnet(t, w1, b1, w2, b2, w3):
    """``(gamma, gamma')`` of the monotone network with gamma' written out:
    ``gamma' = |w1| + (1/n) sum_j |w3_j| 2 h_j (1 - h_j) 2 |w2_j|``, ``h = sigmoid(|w2| (2t - 1) + b2)``."""
    t = t.reshape(-1, 1)
    a2, a3 = w2.abs().reshape(1, -1), w3.abs().reshape(-1, 1) / w2.shape[0]
    h = torch.sigmoid(torch.addmm(b2, 2.0 * t - 1.0, a2))
    gamma = torch.addmm(b1 + t * w1.abs(), 2.0 * h - 1.0, a3)
    dgamma = torch.addmm(w1.abs().expand_as(t), 4.0 * h * (1.0 - h) * a2, a3)
    return gamma.reshape(-1), dgamma.reshape(-1)


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
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    out, per_round = [], []
    for B in SIZES:
        inputs = make_inputs(B, args.device)
        lean = lambda: step(lean_nnet, *inputs)  # noqa: E731
        impls = {"reference": lambda: step(ref.nnet, *inputs), "lean": lean, "lean, compiled": compiled(lean),
                 "vdm_fast": lambda: step(ops.gamma_nnet, *inputs)}
        results = measure(impls, args.device, rounds=args.rounds if B <= 1024 else 1, min_time=0.2)
        out += rows({"B": B}, results)
        per_round.append({"B": B, "vdm_fast vs lean, each round": ", ".join(
            f"{lean_s / fused_s:.1f}x" for lean_s, fused_s in zip(results["lean"].rounds, results["vdm_fast"].rounds))})
        if args.device.startswith("cuda"):
            try:
                graphed = time_fn(cuda_graph_replay(impls["vdm_fast"], args.device), args.device)
                out.append({"B": B, "implementation": "vdm_fast, CUDA graph replay", "ms": f"{graphed * 1e3:.4f}"})
            except RuntimeError as err:  # the eager rows stand on their own
                out.append({"B": B, "implementation": "vdm_fast, CUDA graph replay",
                            "ms": f"failed: {err}".splitlines()[0][:80]})
        for row in out[-len(impls):]:
            print(row, flush=True)
    print()
    print(header("Monotone schedule (n=1024), gamma + gamma' forward and backward", args.device))
    print(table(out, ["B", "implementation", "ms", "vdm_fast speed-up", "peak MiB", "first call s"]))
    print()
    print(table(per_round, ["B", "vdm_fast vs lean, each round"]))


if __name__ == "__main__":
    main()
