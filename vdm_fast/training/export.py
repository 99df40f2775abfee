"""Export a training checkpoint's weights as a shareable folder of ``model.safetensors`` and
``config.json`` (the format: ``vdm_fast.io.pretrained``).

    vdm-fast export --ckpt runs/vdm/checkpoint.pt --out vdm-digits [--weights ema|model] [--force]
"""

import argparse
from pathlib import Path

from vdm_fast.extras import require
from vdm_fast.io import CheckpointError, load_model
from vdm_fast.io.pretrained import CONFIG_NAME, WEIGHT_KINDS, WEIGHTS_NAME, save_pretrained


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint.pt of a training run")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    parser.add_argument("--weights", choices=WEIGHT_KINDS, default="ema",
                        help="the EMA weights (default: what evaluate and sample use) or the raw model's")
    parser.add_argument("--force", action="store_true",
                        help="overwrite model.safetensors and config.json in a non-empty existing folder")
    args = parser.parse_args(argv)
    require("export")
    try:
        model, cfg, state = load_model(args.ckpt, use_ema=args.weights == "ema")
        weights = state.get("weights", args.weights)  # a pretrained folder re-exported keeps its own kind
        config = save_pretrained(model, cfg, args.out, step=state["step"], weights=weights, overwrite=args.force)
    except (CheckpointError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}")
    out = Path(args.out)
    print(f"wrote {out / WEIGHTS_NAME} ({len(model.state_dict())} tensors, {(out / WEIGHTS_NAME).stat().st_size} "
          f"bytes, sha256 {config['safetensors_sha256']}) and {out / CONFIG_NAME}: the {weights} weights of "
          f"{args.ckpt} at step {state['step']}")


if __name__ == "__main__":
    main()
