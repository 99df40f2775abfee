"""Sample quality against network evaluations: ancestral, DDIM (eta = 0), DPM-Solver++(2M) and
SDE-DPM-Solver++(2M) on a digits model, each from the same z_1.

    python benchmarks/bench_samplers.py                       # trains a small digits model first
    python benchmarks/bench_samplers.py --ckpt runs/vdm/checkpoint.pt --n 500 --steps 10 20 50 100

The metric: the Frechet distance between the samples and the 1500 training images in the
penultimate-layer features (32 units) of a small classifier, an sklearn MLP (128, 32) fitted on
the training images here in a few seconds: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)``.
Its floor is the 297 test images' own distance to the training images (a perfect model's
samples, at the same sample size: ``--n`` defaults to 297, since the estimate's bias grows as
the sample shrinks); the reference point is the ancestral sampler at 1000 steps, the model's own
chain at the grid the CLI defaults to. Every sampler starts from the same ``z_1`` (the same
seed), so the deterministic samplers' differences are the discretisation's, not the draw's; the
stochastic ones still differ by their noises, and at 297 images one run's distance moves by
about 1 from seed to seed (``--seeds 0 1 2`` averages runs).

Without ``--ckpt`` the benchmark trains a digits model first (``python -m vdm_fast.training.train`` into
a temporary folder: ``--train-steps``, width 32, one ResNet block per level, a few minutes on 2
cores); a model trained with the defaults (``python -m vdm_fast.training.train``) is better and slower to
sample. Prints a table (sampler, steps, network evaluations, distance, seconds) and writes a PNG
plot of distance against evaluations (``--plot``) when matplotlib is installed.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.neural_network import MLPClassifier

from vdm_fast.training import data
from vdm_fast.io import load_model_or_exit
from vdm_fast.samplers import network_evaluations

try:
    from benchmarks.common import table
except ImportError:  # run as a script from the repository root
    from common import table


def features(clf: MLPClassifier, images) -> np.ndarray:
    """The classifier's last hidden layer (ReLU) for integer images ``[N, C, H, W]``."""
    h = images.reshape(len(images), -1).astype(np.float64) / 16.0
    for w, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
        h = np.maximum(h @ w + b, 0.0)
    return h


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to the rows of ``a`` and of ``b``;
    ``tr (S_a S_b)^1/2`` from the eigenvalues of ``S_a^1/2 S_b S_a^1/2`` (symmetric, PSD)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(s_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def train_model(folder: Path, steps: int) -> Path:
    args = [sys.executable, "-m", "vdm_fast.training.train", "--out-dir", str(folder), "--steps", str(steps), "--n-embd", "32",
            "--n-layer", "1", "--sample-n", "0", "--eval-batches", "2", "--log-every", str(max(1, steps // 4))]
    print("training:", " ".join(args[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd="/",
                          env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")})
    if proc.returncode != 0:
        raise SystemExit(f"error: training failed:\n{proc.stderr[-2000:]}")
    summary = [line for line in proc.stdout.splitlines() if "bpd" in line or "baseline" in line]
    print("\n".join(summary), f"\n(trained in {time.perf_counter() - start:.0f} s)", flush=True)
    return folder / "checkpoint.pt"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a digits checkpoint or export folder (default: train one)")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--n", type=int, default=297, help="images per (sampler, steps)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--samplers", nargs="+", default=["ancestral", "ddim", "dpm-solver", "dpm-solver-sde"])
    parser.add_argument("--reference-steps", type=int, default=1000, help="the ancestral reference point")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (its z_1 and noises); the table gives the mean distance and each run's")
    parser.add_argument("--plot", default="runs/bench_samplers.png", help="the plot's PNG (matplotlib)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seeds[0])

    ds = data.load_digits()
    train_images, test_images = ds.train.images.numpy(), ds.test.images.numpy()
    start = time.perf_counter()
    clf = MLPClassifier(hidden_layer_sizes=(128, 32), max_iter=500, random_state=0)
    clf.fit(train_images.reshape(len(train_images), -1) / 16.0, ds.train.labels.numpy())
    accuracy = clf.score(test_images.reshape(len(test_images), -1) / 16.0, ds.test.labels.numpy())
    reference = features(clf, train_images)
    floor = frechet(features(clf, test_images), reference)
    print(f"classifier: MLP (128, 32) on the {len(train_images)} training images, test accuracy {accuracy:.3f}, "
          f"{time.perf_counter() - start:.1f} s; floor (the {len(test_images)} test images): {floor:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or train_model(Path(tmp) / "run", args.train_steps)
        model, cfg, _ = load_model_or_exit(ckpt)
        model.eval()
        if model.num_classes:
            raise SystemExit("error: the benchmark samples an unconditional model")
        if tuple(model.image_shape) != (1, 8, 8):
            raise SystemExit("error: the benchmark needs a digits model ([1, 8, 8] images)")
        settings = [(s, n) for s in args.samplers for n in args.steps]
        settings.append(("ancestral", args.reference_steps))
        rows = [{"sampler": "test images (floor)", "steps": "", "network evaluations": "",
                 "Frechet distance": f"{floor:.3f}", "per seed": "", "seconds": ""}]
        results = []
        for sampler, steps in settings:
            distances, seconds = [], 0.0
            for seed in args.seeds:
                start = time.perf_counter()
                images = model.sample(args.n, steps, generator=torch.Generator().manual_seed(seed), sampler=sampler)
                seconds += time.perf_counter() - start
                distances.append(frechet(features(clf, images.numpy()), reference))
            nfe = network_evaluations(steps)
            results.append((sampler, nfe, float(np.mean(distances))))
            rows.append({"sampler": sampler, "steps": steps, "network evaluations": nfe,
                         "Frechet distance": f"{np.mean(distances):.2f}",
                         "per seed": " ".join(f"{d:.2f}" for d in distances),
                         "seconds": f"{seconds / len(args.seeds):.1f}"})
            print(rows[-1], flush=True)

    spacing = "; spacing: ancestral and ddim uniform in t, the dpm-solvers uniform in log-SNR"
    print(f"\n## Samplers on digits: Frechet distance in MLP features against network evaluations\n\n"
          f"{args.n} samples per run, the same z_1 for every sampler (seeds {' '.join(map(str, args.seeds))}; "
          f"distance: the mean over the seeds; seconds: per run), ddim with eta = 0{spacing}; "
          f"model: {ckpt if args.ckpt else f'digits, n_embd 32, n_layer 1, {args.train_steps} steps'} "
          f"({cfg.schedule} schedule); torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(table(rows, ["sampler", "steps", "network evaluations", "Frechet distance", "per seed", "seconds"]))
    try:
        import matplotlib
    except ImportError:
        print("\n(matplotlib is not installed: no plot; pip install matplotlib for one)")
        return rows
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in args.samplers:
        xs = [nfe for s, nfe, _ in results if s == sampler]
        ys = [d for s, _, d in results if s == sampler]
        ax.plot(xs, ys, marker="o", label=sampler)
    ref = [d for s, nfe, d in results if s == "ancestral" and nfe == args.reference_steps][-1]
    ax.axhline(ref, color="gray", linestyle="--", label=f"ancestral, {args.reference_steps} steps")
    ax.axhline(floor, color="black", linestyle=":", label="test images (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations")
    ax.set_ylabel("Frechet distance (MLP features)")
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
