"""U-Net blocks, forward + backward: the reference eager, ``torch.compile`` of the reference, the
plain torch a user would write (GroupNorm: ``silu(group_norm(x + cond))`` in x's dtype, no
casts), and the fused op, side by side in one run, with peak memory.

    python benchmarks/bench_unet.py [--device cpu|cuda] [--batch B]

CUDA: bf16, C = 128 at 32x32 and 64x64 (the CIFAR-10 U-Net's blocks), NCHW and channels_last,
and a whole CIFAR-10 U-Net training step. CPU: the digits model's blocks (C = 64, 8x8) in fp32
NCHW and, as its bf16 training runs them, in bf16 NCHW and channels_last; a CIFAR-10 block
(C = 128, 32x32) in fp32 NCHW and bf16 channels_last. On the CPU the GroupNorm runs the C++
kernels and the attention block the reference in float32 (vdm_fast.backend says why).

GroupNorm+SiLU also reports GB/s (x and y forward; x, dy and dx backward) against the measured
copy bandwidth.
"""

import argparse

import torch
import torch.nn.functional as F

from vdm_fast import backend
from vdm_fast import nn as vnn
from vdm_fast.ops import attention as fused_attention
from vdm_fast.ops import norm as fused_norm
from vdm_fast.reference import attention as reference_attention
from vdm_fast.reference import norm as reference_norm

try:
    from benchmarks.common import compiled, header, measure, rows, table
except ImportError:  # run as a script from the repository root
    from common import compiled, header, measure, rows, table


def fwd_bwd(fn, *inputs):
    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return step


def implementations(reference, fused, *inputs, baseline=None):
    impls = {"reference": fwd_bwd(reference, *inputs), "reference, compiled": fwd_bwd(compiled(reference), *inputs)}
    if baseline is not None:
        impls["plain torch"] = fwd_bwd(baseline, *inputs)
    return {**impls, "vdm_fast": fwd_bwd(fused, *inputs)}


def norm_rows(dev, dt, B, C, size, layouts):
    out = []
    x = torch.randn(B, C, size, size, device=dev, dtype=dt)
    w, b = (torch.randn(C, device=dev, requires_grad=True) for _ in range(2))
    cond = torch.randn(B, C, device=dev, dtype=dt, requires_grad=True)
    for layout, name in layouts:
        xl = x.contiguous(memory_format=layout).requires_grad_()
        results = measure(implementations(
            lambda x, w, b, c: reference_norm.group_norm_silu(x, w, b, 32, 1e-6, True, c),
            lambda x, w, b, c: fused_norm.group_norm_silu(x, w, b, 32, 1e-6, True, c), xl, w, b, cond,
            baseline=lambda x, w, b, c: F.silu(F.group_norm(x + c[:, :, None, None], 32, w, b, 1e-6))), dev)
        dtype = str(dt).removeprefix("torch.")
        out += rows({"block": f"GroupNorm+SiLU+cond, B={B}, C={C}, {size}x{size} {name} {dtype}"}, results)
        out[-1]["GB/s"] = f"{5 * x.numel() * x.element_size() / results['vdm_fast'].seconds / 1e9:.0f}"
    return out


def attention_rows(dev, dt, B, C, size):
    x = torch.randn(B, C, size, size, device=dev, dtype=dt, requires_grad=True)
    p = [(torch.randn(s, device=dev) * 0.05).requires_grad_() for s in ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,))]
    with torch.autocast(dev, dtype=dt, enabled=dt != torch.float32):
        results = measure(implementations(lambda *a: reference_attention.attention_block(*a, 1, 32, 1e-6),
                                          lambda *a: fused_attention.attention_block(*a, 1, 32, 1e-6), x, *p), dev)
    return rows({"block": f"attention block, B={B}, C={C}, {size}x{size} {str(dt).removeprefix('torch.')}"}, results)


def cifar_training_step_rows(dev, dt, B):
    """The CIFAR-10 U-Net (channels_last, bf16 autocast), forward + backward + AdamW."""
    net = vnn.ScoreUNet(in_channels=3).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    z, g = torch.randn(B, 3, 32, 32, device=dev), torch.rand(B, device=dev) * 18 - 13

    def train_step(model, name):
        def step():
            with backend.use(name), torch.autocast(dev, dtype=dt):
                loss = model(z, g).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    results = measure({"reference": train_step(net, "reference"),
                       "reference, compiled": train_step(compiled(net), "reference"),
                       "vdm_fast": train_step(net, "auto")}, dev, min_time=2.0)
    return rows({"block": f"CIFAR-10 U-Net training step, B={B}"}, results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 64 on the CPU")
    args = parser.parse_args()
    dev = args.device
    layouts = [(torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")]
    out = []
    if dev == "cuda":
        dt, B = torch.bfloat16, args.batch or 128
        for size in (32, 64):
            out += norm_rows(dev, dt, B, 128, size, layouts) + attention_rows(dev, dt, B, 128, size)
            print(*out, sep="\n", flush=True)
        out += cifar_training_step_rows(dev, dt, B)
    else:
        B = args.batch or 64
        f32, bf16 = torch.float32, torch.bfloat16
        out += norm_rows(dev, f32, B, 64, 8, layouts[:1]) + norm_rows(dev, bf16, B, 64, 8, layouts)
        out += attention_rows(dev, f32, B, 64, 8) + attention_rows(dev, bf16, B, 64, 8)
        print(*out, sep="\n", flush=True)
        out += norm_rows(dev, f32, B, 128, 32, layouts[:1]) + norm_rows(dev, bf16, B, 128, 32, layouts[1:])
        out += attention_rows(dev, f32, B, 128, 32)
    print()
    print(header("U-Net blocks, forward + backward", dev))
    print(table(out, ["block", "implementation", "ms", "vdm_fast speed-up", "peak MiB", "first call s", "GB/s"]))


if __name__ == "__main__":
    main()
