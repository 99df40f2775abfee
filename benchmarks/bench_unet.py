"""U-Net blocks on the GPU: fused (Triton) vs reference eager vs torch.compile of the reference,
forward + backward, bf16, in one run; and a whole CIFAR-10 U-Net training step.

    python benchmarks/bench_unet.py            (needs a CUDA GPU)

GroupNorm+SiLU also reports GB/s (x and y forward; x, dy and dx backward) against the measured
copy bandwidth.
"""

import argparse

import torch

from vdm_fast import nn as vnn
from vdm_fast.ops import attention as fused_attention
from vdm_fast.ops import norm as fused_norm
from vdm_fast.reference import attention as reference_attention
from vdm_fast.reference import norm as reference_norm

try:
    from benchmarks.common import header, table, time_fn
except ImportError:  # run as a script from the repository root
    from common import header, table, time_fn


def fwd_bwd(fn, inputs):
    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_unet measures the GPU kernels: it needs a CUDA GPU")
    dev, dt, B, C = "cuda", torch.bfloat16, args.batch, 128
    rows = []
    for size in (32, 64):
        x = torch.randn(B, C, size, size, device=dev, dtype=dt, requires_grad=True)
        w, b = (torch.randn(C, device=dev, requires_grad=True) for _ in range(2))
        cond = torch.randn(B, C, device=dev, dtype=dt, requires_grad=True)
        norm_impls = {"fused": fused_norm.group_norm_silu, "eager": reference_norm.group_norm_silu,
                      "compiled": torch.compile(reference_norm.group_norm_silu)}
        for layout, name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")):
            xl = x.detach().contiguous(memory_format=layout).requires_grad_()
            times = {k: time_fn(fwd_bwd(lambda x, w, b, c, f=f: f(x, w, b, 32, 1e-6, True, c), (xl, w, b, cond)),
                                dev) for k, f in norm_impls.items()}
            gbs = 5 * x.numel() * x.element_size() / times["fused"] / 1e9
            rows.append({"block": f"GroupNorm+SiLU+cond {size}x{size} {name}",
                         **{k: f"{v * 1e3:.3f}" for k, v in times.items()},
                         "fused vs eager": f"{times['eager'] / times['fused']:.2f}x",
                         "fused vs compiled": f"{times['compiled'] / times['fused']:.2f}x", "fused GB/s": f"{gbs:.0f}"})
            print(rows[-1], flush=True)
        p = [(torch.randn(s, device=dev) * 0.05).requires_grad_() for s in ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,))]
        attn_impls = {"fused": fused_attention.attention_block, "eager": reference_attention.attention_block,
                      "compiled": torch.compile(reference_attention.attention_block)}
        with torch.autocast("cuda", dtype=dt):
            times = {k: time_fn(fwd_bwd(lambda x, *q, f=f: f(x, *q, 1, 32, 1e-6), (x, *p)), dev)
                     for k, f in attn_impls.items()}
        rows.append({"block": f"attention block {size}x{size}", **{k: f"{v * 1e3:.3f}" for k, v in times.items()},
                     "fused vs eager": f"{times['eager'] / times['fused']:.2f}x",
                     "fused vs compiled": f"{times['compiled'] / times['fused']:.2f}x"})
        print(rows[-1], flush=True)

    net = vnn.ScoreUNet(in_channels=3).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    z, g = torch.randn(B, 3, 32, 32, device=dev), torch.rand(B, device=dev) * 18 - 13
    steps = {}
    for ops in ("reference", "fused"):
        net.set_ops(ops)

        def train_step():
            with torch.autocast("cuda", dtype=dt):
                loss = net(z, g).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[ops] = time_fn(train_step, dev, min_time=2.0)
    rows.append({"block": "CIFAR-10 U-Net training step", "fused": f"{steps['fused'] * 1e3:.1f}",
                 "eager": f"{steps['reference'] * 1e3:.1f}", "fused vs eager": f"{steps['reference'] / steps['fused']:.2f}x"})
    print()
    print(header(f"U-Net blocks, B={B}, C={C}, bf16, forward + backward (ms)", dev))
    print(table(rows, ["block", "eager", "compiled", "fused", "fused vs eager", "fused vs compiled", "fused GB/s"]))


if __name__ == "__main__":
    main()
