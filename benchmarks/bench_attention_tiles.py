"""The flash-attention kernels' tile variants (``kernels/attention_tiles.py``) against each other
and against ``torch.nn.functional.scaled_dot_product_attention``, side by side on one card, so
that one run picks the defaults.

    python benchmarks/bench_attention_tiles.py [--dtypes bf16 fp32-tf32 ...] [--head-dims 64 128 256]
                                               [--tokens 1024] [--bh 64] [--budget-s 110]

Per dtype (``bf16``, ``fp16``, ``fp32-tf32``, ``fp32-ieee``: float32 with torch's TF32 setting
on or off), head dim and token count: every variant of the table (and, where the table routes
the head dim to SDPA, none) and SDPA, each timed forward and backward (``triton.testing
.do_bench``, median), with the forward's error against SDPA's. The last lines give, per dtype and
head dim, the fastest of them as the ``DEFAULT`` entry to write (``"sdpa"``: route the head dim to
SDPA, i.e. remove it from ``DEFAULT``). Rows print as they are measured; past ``--budget-s`` no
new case starts, so a run cut short still leaves its table. Needs a CUDA device (``--help``
works anywhere).
"""

import argparse
import contextlib
import sys
import time

import torch

DTYPES = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None), "fp32-tf32": (torch.float32, True),
          "fp32-ieee": (torch.float32, False)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp32-tf32", "fp32-ieee"], choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="*", type=int, default=[64, 128, 256],
                        help="the U-Net presets' widths with one head: digits 64, CIFAR-10 128, ImageNet 256")
    parser.add_argument("--tokens", nargs="*", type=int, default=[1024], help="H*W: 1024 is 32x32")
    parser.add_argument("--bh", type=int, default=64, help="batch x heads")
    parser.add_argument("--budget-s", type=float, default=110.0, help="start no case after this many seconds")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of timing per measurement")
    return parser.parse_args(argv)


@contextlib.contextmanager
def float32_matmul_precision(tf32):
    """torch's float32 matmul setting for SDPA, matching the kernels' ``tf32`` (legacy API, which
    ``attention_tiles.tf32_allowed`` reads too)."""
    before = torch.get_float32_matmul_precision()
    if tf32 is not None:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def implementations(q, k, v, do, scale, dtype, tf32, d):
    """``{name: (forward, backward)}``: each variant of the table for this head dim, and SDPA."""
    from vdm_fast.kernels import attention, attention_tiles

    kind = attention_tiles.kind(dtype, tf32)
    table = attention_tiles.VARIANTS[kind].get(attention_tiles.block_d(d), {})
    impls = {}
    for name in table:
        def forward(name=name):
            return attention.flash_attention_forward(q, k, v, scale, variant=name, tf32=tf32)
        o, lse = forward()

        def backward(name=name, o=o, lse=lse):
            return attention.flash_attention_backward(do, q, k, v, o, lse, scale, variant=name, tf32=tf32)
        impls[name] = (forward, backward, o)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def sdpa_forward():
        return torch.nn.functional.scaled_dot_product_attention(*leaves, scale=scale)
    out = sdpa_forward()

    def sdpa_backward():
        return torch.autograd.grad(out, leaves, do, retain_graph=True)
    impls["sdpa"] = (sdpa_forward, sdpa_backward, out.detach())
    return impls, kind, attention_tiles.DEFAULT[kind].get(attention_tiles.block_d(d), "sdpa")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention_tiles.py times kernels on a CUDA device; there is none here")
        return 2
    try:
        from benchmarks.common import time_fn
    except ImportError:  # run as a script from the repository root
        from common import time_fn
    start = time.time()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}; BH = {args.bh}")
    print("| dtype | d | N | impl | default | fwd ms | bwd ms | fwd+bwd ms | vs SDPA | fwd error vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    picks = {}
    for label in args.dtypes:
        dtype, tf32 = DTYPES[label]
        for d in args.head_dims:
            for N in args.tokens:
                if time.time() - start > args.budget_s:
                    print(f"(budget of {args.budget_s:.0f} s spent: {label} d={d} N={N} and later not run)")
                    break
                torch.manual_seed(0)
                q, k, v, do = (torch.randn(args.bh, N, d, device=dev, dtype=dtype) for _ in range(4))
                with float32_matmul_precision(tf32):
                    try:
                        impls, kind, default = implementations(q, k, v, do, d ** -0.5, dtype, tf32, d)
                    except Exception as err:  # one broken variant must not cost the others' rows
                        print(f"| {label} | {d} | {N} | FAILED: {type(err).__name__}: {str(err)[:200]} |")
                        continue
                    reference = impls["sdpa"][2].float()
                    results = {}
                    for name, (forward, backward, o) in impls.items():
                        fwd, bwd = time_fn(forward, dev, args.min_time), time_fn(backward, dev, args.min_time)
                        err = ((o.float() - reference).abs().max() / reference.abs().max()).item()
                        results[name] = (fwd, bwd, err)
                sdpa_total = sum(results["sdpa"][:2])
                for name, (fwd, bwd, err) in results.items():
                    mark = "yes" if name == default else ""
                    print(f"| {label} | {d} | {N} | {name} | {mark} | {fwd * 1e3:.3f} | {bwd * 1e3:.3f} | "
                          f"{(fwd + bwd) * 1e3:.3f} | {sdpa_total / (fwd + bwd):.2f}x | {err:.1e} |", flush=True)
                # The pick: fastest forward + backward among those whose forward agrees with SDPA.
                tol = 2e-2 if dtype != torch.float32 or tf32 else 1e-4
                ok = {n: r[0] + r[1] for n, r in results.items() if r[2] <= tol or n == "sdpa"}
                picks.setdefault((kind, d), []).append(min(ok, key=ok.get))
    print()
    print("picks (fastest forward + backward; DEFAULT[kind][BLOCK_D] = the variant, \"sdpa\": drop the entry):")
    for (kind, d), names in picks.items():
        print(f"  {kind} d={d}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
