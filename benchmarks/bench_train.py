"""Training steps with the reference ops, the same with ``torch.compile`` of the score network,
and the fused ops: same model and batch, side by side in one run, with peak memory.

    python benchmarks/bench_train.py [--device cpu|cuda] [--schedules scalar nnet]

The reference steps run under ``vdm_fast.backend.use("reference")``. CPU: the
default digits model (batch 64, 8x8x1, 17 levels) and a small U-Net (32 channels, 2 blocks) on
8-bit 32x32x3 images, batch 32. CUDA: the CIFAR-10 model (batch 128, 32x32x3, 128 channels, 32
blocks), bf16 autocast and channels_last, as the driver runs it. The optimiser is AdamW as the
driver builds it (fused on CPU and CUDA).
"""

import argparse
import copy

import torch

from vdm_fast import backend
from vdm_fast.config import resolve
from vdm_fast.factory import build_model
from vdm_fast.training.optim import make_optimizer

try:
    from benchmarks.common import compiled, header, measure, rows, table
except ImportError:  # run as a script from the repository root
    from common import compiled, header, measure, rows, table


def training_step(model, optimizer, x, name):
    def step():
        with backend.use(name):
            loss = model(x).bpd.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return step


def implementations(cfg, shape, vocab, device):
    """The three steps, each on its own copy of one initial model and its own optimiser."""
    torch.manual_seed(0)
    model = build_model(cfg, shape, vocab).to(device)
    if device.type == "cuda":  # as the driver runs it: channels_last, the score network in bf16
        model = model.to(memory_format=torch.channels_last)
        model.autocast_dtype = torch.bfloat16
    x = torch.randint(0, vocab, (cfg.batch_size, *shape), device=device)
    out = {}
    for name, choice in (("reference", "reference"), ("reference, compiled", "reference"), ("vdm_fast", "auto")):
        m = copy.deepcopy(model)
        if name.endswith("compiled"):
            # The score network only: the reference schedule's gamma' takes a double backward,
            # which torch.compile cannot differentiate through.
            m.score_net = compiled(m.score_net)
        out[name] = training_step(m, make_optimizer(m, cfg), x, choice)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schedules", nargs="+", default=["scalar", "nnet"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        cases = [("CIFAR-10 model, B=128", dict(data="cifar10", data_dir="-"), (3, 32, 32), 256)]
    else:
        cases = [("digits model, B=64", dict(data="digits"), (1, 8, 8), 17),
                 ("small U-Net, 32x32x3 8-bit, B=32",
                  dict(data="cifar10", data_dir="-", n_embd=32, n_layer=2, batch_size=32), (3, 32, 32), 256)]
    out = []
    for name, overrides, shape, vocab in cases:
        for schedule in args.schedules:
            cfg = resolve(dict(overrides, schedule=schedule))
            results = measure(implementations(cfg, shape, vocab, device), device, rounds=3, min_time=2.0)
            out += rows({"model": name, "schedule": schedule}, results)
            print(*out[-len(results):], sep="\n", flush=True)
    print()
    print(header("Training step (forward, backward, AdamW)", args.device))
    print(table(out, ["model", "schedule", "implementation", "ms", "vdm_fast speed-up", "peak MiB", "first call s"]))


if __name__ == "__main__":
    main()
