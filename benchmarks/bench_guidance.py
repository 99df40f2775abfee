"""Classifier-free guidance on a class-conditional model: are guided samples of class c
recognised as c? A logistic regression fitted on the real training images judges them.

    python -m vdm_fast.training.train --out-dir runs/cond --conditional --guidance 2
    python benchmarks/bench_guidance.py --ckpt runs/cond/checkpoint.pt --scales 0 1 2 4

Prints, per guidance scale, the share of samples classified as the class they were asked for
(10 % is chance for 10 classes), and the classifier's accuracy on the real test images.
"""

import argparse

import torch
from sklearn.linear_model import LogisticRegression

from vdm_fast.training import data
from vdm_fast.io import load_model_or_exit

try:
    from benchmarks.common import table
except ImportError:  # run as a script from the repository root
    from common import table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--T", type=int, default=200)
    args = parser.parse_args()

    model, cfg, _ = load_model_or_exit(args.ckpt)
    if not model.num_classes:
        raise SystemExit("error: the checkpoint is not a class-conditional model (--conditional)")
    ds = data.load(cfg.data, cfg.data_dir)
    flat = lambda imgs: imgs.reshape(len(imgs), -1).float().numpy()  # noqa: E731
    clf = LogisticRegression(max_iter=5000).fit(flat(ds.train.images), ds.train.labels.numpy())
    rows = [{"samples": "real test images", "recognised as asked": f"{clf.score(flat(ds.test.images), ds.test.labels.numpy()):.3f}"}]
    model.eval()
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    for scale in args.scales:
        images = model.sample(len(labels), args.T, generator=torch.Generator().manual_seed(0), labels=labels,
                              guidance=scale)
        rate = (clf.predict(flat(images)) == labels.numpy()).mean()
        rows.append({"samples": f"guidance scale {scale:g}", "recognised as asked": f"{rate:.3f}"})
        print(rows[-1], flush=True)
    print()
    print(f"## Classifier-free guidance, {cfg.data}, {args.per_class} samples per class, T={args.T}\n")
    print(table(rows, ["samples", "recognised as asked"]))


if __name__ == "__main__":
    main()
