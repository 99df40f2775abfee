"""Training steps per second with the fused ops vs the reference ops, same model and batch, in
one run (``VDM_FAST_BACKEND=reference`` switches every op to its plain-PyTorch reference).

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps N]

CPU: the default digits model (batch 64, 8x8x1, 17 levels) and a small U-Net (32 channels,
2 blocks) on 8-bit 32x32x3 images, batch 32. CUDA: the CIFAR-10 model (batch 128, 32x32x3,
128 channels, 32 blocks), bf16 autocast and channels_last, as the driver runs it.
"""

import argparse
import os
import time

import torch

from vdm_fast.checkpoint import build_model
from vdm_fast.config import resolve

try:
    from benchmarks.common import header, sync, table
except ImportError:  # run as a script from the repository root
    from common import header, sync, table


def steps_per_second(cfg, shape, vocab, device, steps, schedule):
    torch.manual_seed(0)
    model = build_model(resolve(dict(cfg, schedule=schedule)), shape, vocab).to(device)
    if device.type == "cuda":  # as the driver runs it: channels_last, the score network in bf16
        model = model.to(memory_format=torch.channels_last)
        model.autocast_dtype = torch.bfloat16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (cfg["batch_size"], *shape), device=device)

    def step():
        loss = model(x).bpd.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        cases = [("CIFAR-10 model, B=128", dict(data="cifar10", data_dir="-"), (3, 32, 32), 256)]
    else:
        cases = [("digits model, B=64", dict(data="digits"), (1, 8, 8), 17),
                 ("small U-Net, 32x32x3 8-bit, B=32",
                  dict(data="cifar10", data_dir="-", n_embd=32, n_layer=2, batch_size=32), (3, 32, 32), 256)]
    rows = []
    for name, overrides, shape, vocab in cases:
        cfg = vars(resolve(overrides))
        for schedule in ("scalar", "nnet"):
            speeds = {}
            for backend in ("reference", "auto"):
                os.environ["VDM_FAST_BACKEND"] = backend
                speeds[backend] = steps_per_second(cfg, shape, vocab, device, args.steps, schedule)
            os.environ["VDM_FAST_BACKEND"] = "auto"
            rows.append({"model": name, "schedule": schedule, "reference steps/s": f"{speeds['reference']:.2f}",
                         "fused steps/s": f"{speeds['auto']:.2f}",
                         "speed-up": f"{speeds['auto'] / speeds['reference']:.2f}x"})
            print(rows[-1], flush=True)
    print()
    print(header("Training step (forward, backward, AdamW)", args.device))
    print(table(rows, ["model", "schedule", "reference steps/s", "fused steps/s", "speed-up"]))


if __name__ == "__main__":
    main()
