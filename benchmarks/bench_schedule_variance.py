"""The learned monotone schedule trained on the bound (the official form) against the paper's
variance minimisation (endpoints pinned and on the bound, the interior on the variance of the
diffusion loss), side by side in one run on the bundled digits.

    python benchmarks/bench_schedule_variance.py [--steps 2000] [--draws 64]

For each arm: train the default digits model with ``--schedule nnet`` (and
``--schedule-objective variance``), then, with its EMA weights in eval mode, the test bpd and the
spread of the bound's per-batch estimate: the standard deviation, over ``--draws`` independent
draws of times and noises, of the mean bpd of one fixed test batch of 64 images (what one
training step's loss estimate varies by).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vdm_fast.training import data, train
from vdm_fast.io import load_model
from vdm_fast.config import resolve

try:
    from benchmarks.common import header, table
except ImportError:  # run as a script from the repository root
    from common import header, table


@torch.no_grad()
def batch_estimate_spread(model, images, draws: int) -> float:
    model.eval()
    estimates = torch.stack([model(images, generator=torch.Generator().manual_seed(1000 + i)).bpd.mean()
                             for i in range(draws)])
    return estimates.std().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=64)
    args = parser.parse_args()
    test = data.load_digits().test.images[:64]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for objective in ("elbo", "variance"):
            cfg = resolve({"schedule": "nnet", "schedule_objective": objective, "steps": args.steps,
                           "out_dir": str(Path(root) / objective), "sample_n": 0})
            start = time.perf_counter()
            result = train.train(cfg)
            seconds = time.perf_counter() - start
            model, _, _ = load_model(Path(root) / objective / "checkpoint.pt")
            gammas = model.schedule(torch.tensor([0.0, 1.0]))[0]
            rows.append({"schedule objective": objective, "test bpd": f"{result['test_bpd']:.4f}",
                         "std of batch bpd": f"{batch_estimate_spread(model, test, args.draws):.4f}",
                         "gamma(0) / gamma(1)": f"{gammas[0].item():.2f} / {gammas[1].item():.2f}",
                         "train s": f"{seconds:.0f}"})
    print(header(f"monotone schedule on digits, {args.steps} steps each, batch-estimate spread over "
                 f"{args.draws} draws", "cpu"))
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
