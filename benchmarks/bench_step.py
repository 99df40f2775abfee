"""Training-step time of the driver, eager against ``--compile`` (and ``--cuda-graphs`` on CUDA):
``vdm_fast.training.train``'s own step (forward, backward, clipping, AdamW, EMA, the non-finite
guards), the same model, batch, seed and steps for every variant.

    python benchmarks/bench_step.py [--model digits|cifar10] [--batch-size B] [--device cpu|cuda]
                                    [--variants eager compile cuda-graphs] [--steps N] [--rounds R]
                                    [--bf16 true|false] [--threads T] [--json PATH]

``digits``: ``vdm-fast train``'s defaults on the bundled digits. ``cifar10``: the CIFAR-10 model
(128 channels, 32 ResNet blocks down, 32x32x3 8-bit) on random images written to a ``.npy``
(only the shapes matter to the time), dropout 0: with dropout, ``--cuda-graphs`` steps eagerly
(its masks' generators cannot be captured), and eager against captured is what is measured.

Each variant is its own run (``Run``, in a temporary folder); its first step is timed alone
(compilation; under ``--cuda-graphs`` the capture comes after 3 eager steps), then it warms up,
then rounds of ``--steps`` steps alternate between the variants (a shared machine's drifting
speed falls on all alike) and the median round gives the step time: wall clock, the device
synchronised at the end of each round. Prints a Markdown table; ``--json`` saves every round.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vdm_fast.config import parse_args
from vdm_fast.training.distributed import Distributed
from vdm_fast.training.train import Run

try:
    from benchmarks.common import device_name, sync, table
except ImportError:  # run as a script from the repository root
    from common import device_name, sync, table

VARIANTS = {"eager": [], "compile": ["--compile"], "cuda-graphs": ["--cuda-graphs"]}


def model_flags(model: str, folder: Path) -> list:
    if model == "digits":
        return []
    images = np.random.default_rng(0).integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8)
    np.save(folder / "images.npy", images)
    return ["--data", "npy", "--data-dir", str(folder / "images.npy"), "--n-embd", "128", "--n-layer", "32",
            "--dropout", "0"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--batch-size", type=int, help="default: the model's (digits 64, cifar10 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS),
                        help="default: eager and compile, and cuda-graphs on CUDA")
    parser.add_argument("--steps", type=int, default=10, help="steps a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="steps after the first before timing")
    parser.add_argument("--bf16", default="true", help="the trainer's --bf16 (it takes effect where bf16 is native)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write every round's figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants or (["eager", "compile"] + (["cuda-graphs"] if device.type == "cuda" else []))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flags = model_flags(args.model, folder) + ["--device", device.type, "--bf16", args.bf16]
        if args.batch_size:
            flags += ["--batch-size", str(args.batch_size)]
        runs, first = {}, {}
        for name in variants:
            cfg = parse_args([*flags, *VARIANTS[name], "--out-dir", str(folder / name)])
            (folder / name).mkdir()
            runs[name] = Run(cfg, Distributed(device.type))
            start = time.perf_counter()
            runs[name].train_step()
            sync(device)
            first[name] = time.perf_counter() - start
            for _ in range(args.warmup):
                runs[name].train_step()
            sync(device)
            print(f"{name}: first step {first[name]:.1f} s", file=sys.stderr, flush=True)
        batch = runs[variants[0]].cfg.batch_size
        times = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, run in runs.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    run.train_step()
                sync(device)
                times[name].append((time.perf_counter() - start) / args.steps)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    where = device_name(device)
    print(f"{time.strftime('%Y-%m-%d')} · {where} · torch {torch.__version__} · {args.model}, batch {batch}, "
          f"bf16 {args.bf16}\n")
    rows = []
    for name in variants:
        ms = statistics.median(times[name]) * 1e3
        ratio = statistics.median(a / b for a, b in zip(times[name], times[variants[0]]))
        rows.append({"variant": name, "ms a step": f"{ms:.1f}", "images/s": f"{batch / ms * 1e3:.0f}",
                     f"/ {variants[0]}": f"{ratio:.2f}", "first step s": f"{first[name]:.1f}"})
    print(table(rows, ["variant", "ms a step", "images/s", f"/ {variants[0]}", "first step s"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": where, "torch": torch.__version__, "model": args.model, "batch": batch,
                       "rows": rows, "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
