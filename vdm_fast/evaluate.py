"""Test-set bits per dim of a trained VDM: ``python -m vdm_fast.evaluate --ckpt PATH``."""

import argparse
import math

import torch

from vdm_fast._extras import require

require("train")  # a one-line message, not an ImportError, without the extra

from tqdm import tqdm

from vdm_fast import data as datasets
from vdm_fast.checkpoint import model_for_cli


@torch.no_grad()
def test_bpd(model, images: torch.Tensor, batch_size: int, T: int = 0, max_batches: int = 0,
             device="cpu", seed: int = 0, progress: bool = False, labels=None) -> float:
    """Mean bits per dim of ``images`` (one Monte-Carlo sample of the bound per image), with
    the model in eval mode and a fixed seed, so two evaluations of one model agree. A
    conditional model needs the ``labels``: its bound is that of ``-log p(x | c)``."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    n_batches = math.ceil(len(images) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    total, count = 0.0, 0
    for i in tqdm(range(n_batches), desc=f"test bpd (T={T or 'continuous'})", disable=not progress, leave=False):
        part = slice(i * batch_size, (i + 1) * batch_size)
        x = images[part].to(device)
        y = labels[part].to(device) if labels is not None else None
        total += model(x, T=T, generator=generator, labels=y).bpd.double().sum().item()
        count += len(x)
    model.train(was_training)
    return total / count


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vdm_fast.evaluate", description=__doc__)
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint.pt of a training run, or a folder written by python -m vdm_fast.export")
    parser.add_argument("--T", type=int, default=0, help="0: continuous-time bound; else T steps")
    parser.add_argument("--batches", type=int, default=0, help="test batches to use (0: all)")
    parser.add_argument("--data-dir", default=None, help="dataset location, if moved since training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model, cfg, state = model_for_cli(args.ckpt)
    try:
        ds = datasets.load(cfg.data, args.data_dir or cfg.data_dir)
    except datasets.DataError as err:
        raise SystemExit(f"error: {err} (pass --data-dir if the data moved)")
    if ds.vocab_size != model.vocab_size or ds.image_shape != model.image_shape:
        raise SystemExit(f"error: {args.ckpt} models {model.vocab_size}-level images of shape {model.image_shape}, "
                         f"but its dataset {cfg.data} holds {ds.vocab_size}-level images of shape {ds.image_shape}")
    model.to(args.device)
    bpd = test_bpd(model, ds.test.images, cfg.batch_size, T=args.T, max_batches=args.batches,
                   device=args.device, progress=True, labels=ds.test.labels if model.num_classes else None)
    baseline = datasets.histogram_bpd(ds.train.images, ds.test.images, ds.vocab_size)
    print(f"step {state['step']}: test bpd {bpd:.4f} (T={args.T or 'continuous'}, EMA weights); "
          f"per-pixel histogram baseline {baseline:.4f}")


if __name__ == "__main__":
    main()
