"""The CPU kernels on a shared machine: the VDM loss terms forward+backward (B = 128, 3x32x32,
8-bit) and one training step of the default digits model, idle and beside one and two busy
neighbour processes, with OpenMP's wait policy as libgomp leaves it (threads spin for a while
after every parallel region) and with ``OMP_WAIT_POLICY=passive`` (they sleep).

    python benchmarks/bench_threads.py [--reps 15]

``vdm_fast._C`` and torch's CPU build both need ``libgomp.so.1``; whichever loads first, the
dynamic linker gives the other the same library (same soname), so the process has one OpenMP
runtime and one wait policy, read from the environment when libgomp loads. Each cell is the
median of ``--reps`` timed calls in a fresh process.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = {"libgomp default": {}, "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"}}


def child(reps: int) -> dict:
    import torch

    from vdm_fast import ops
    from vdm_fast.factory import build_model
    from vdm_fast.config import resolve

    gen = torch.Generator().manual_seed(0)
    B, shape = 128, (3, 32, 32)
    x = torch.randint(0, 256, (B, *shape), generator=gen)
    eps, eps_0 = (torch.randn(B, *shape, generator=gen) for _ in range(2))
    eps_hat = torch.randn(B, *shape, generator=gen, requires_grad=True)
    gamma_t = torch.rand(B, generator=gen).mul(18.3).sub(13.3).requires_grad_(True)
    g0, g1 = torch.tensor(-10.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)

    def loss():
        ops.vlb_terms(x, eps, eps_hat, eps_0, gamma_t, g0, g1, dgamma_dt=torch.full((B,), 18.3)).bpd.sum().backward()

    model = build_model(resolve({}), (1, 8, 8), 17)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    digits = torch.randint(0, 17, (64, 1, 8, 8), generator=gen)

    def step():
        bpd = model(digits, generator=torch.Generator().manual_seed(1)).bpd.mean()
        opt.zero_grad()
        bpd.backward()
        opt.step()

    result = {}
    for name, fn in (("loss", loss), ("step", step)):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = 1e3 * statistics.median(times)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.reps)))
        return
    rows = []
    for neighbours in (0, 1, 2):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(neighbours)]
        try:
            for policy, extra in POLICIES.items():
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)], env={**env, **extra},
                                     capture_output=True, text=True, check=True).stdout
                times = json.loads(out.strip().splitlines()[-1])
                rows.append((neighbours, policy, times["loss"], times["step"]))
        finally:
            for p in busy:
                p.kill()
    print(f"## CPU kernels beside busy neighbour processes ({os.cpu_count()} cores)\n")
    print("| busy neighbours | OpenMP wait policy | loss terms fwd+bwd, ms | digits training step, ms |")
    print("|---|---|---|---|")
    for neighbours, policy, loss_ms, step_ms in rows:
        print(f"| {neighbours} | {policy} | {loss_ms:.1f} | {step_ms:.1f} |")


if __name__ == "__main__":
    main()
