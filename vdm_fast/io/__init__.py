"""Files in and out: training checkpoints (``checkpoint``), exported folders of
``model.safetensors`` + ``config.json`` (``pretrained``), the one atomic write (``atomic``), and
``load_model(path)``, which reads either.

Nothing here unpickles a Python object: checkpoints are read with ``torch.load(weights_only=True)``
and checksummed, exported folders are JSON and safetensors.
"""

from pathlib import Path

from vdm_fast.config import resolve
from vdm_fast.extras import MissingExtra
from vdm_fast.factory import build_model
from vdm_fast.io import checkpoint
from vdm_fast.io.checkpoint import CheckpointError
from vdm_fast.io.pretrained import PretrainedError, load_pretrained, save_pretrained


def load_model(path, use_ema: bool = True):
    """``(model, config, state)`` from a training checkpoint file, with its EMA weights by
    default, or from an exported folder (``vdm-fast export``, ``vdm-fast convert``).

    A folder it holds one set of
    weights, the ones exported (``use_ema=False`` is refused for an EMA export), and ``state`` is
    then ``vdm_fast.io.pretrained.load_pretrained``'s info (``step``, ``config``, ``image_shape``,
    ``vocab_size``, ``num_classes``, ``weights``, ...), not a training state."""
    if Path(path).is_dir():
        try:
            model, cfg, info = load_pretrained(path)
        except MissingExtra as err:
            raise CheckpointError(f"{path} is a pretrained folder: {err}") from err
        if not use_ema and info["weights"] == "ema":
            raise CheckpointError(f"{path} holds only the EMA weights of its run (exported with --weights ema); "
                                  "the raw model weights are in the run's checkpoint.pt")
        return model, cfg, info
    state = checkpoint.load(path)
    try:
        cfg = resolve(state["config"])
        model = build_model(cfg, tuple(state["image_shape"]), state["vocab_size"], state["num_classes"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid configuration: {err}") from err
    checkpoint.load_weights(model, state["ema"] if use_ema else state["model"], path, "EMA" if use_ema else "model")
    return model, cfg, state


def load_model_or_exit(path):
    """For the command-line entries: ``load_model``, or exit with the error."""
    try:
        return load_model(path)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")


__all__ = ["CheckpointError", "PretrainedError", "load_model", "load_model_or_exit", "load_pretrained",
           "save_pretrained"]
