"""Checkpoints of training runs: written atomically, read back with clear errors."""

import os
import tempfile
from pathlib import Path

import torch

from vdm_fast.config import MODEL_FIELDS, TrainConfig, resolve, to_dict
from vdm_fast.nn import SCHEDULES, VDM, ScoreUNet

FORMAT = "vdm_fast.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to this run."""


def build_model(cfg: TrainConfig, image_shape, vocab_size: int, num_classes: int = 0) -> VDM:
    """The VDM of a config: the official score U-Net on the chosen schedule (with
    ``num_classes`` labels when ``cfg.conditional``)."""
    classes = num_classes if cfg.conditional else 0
    if cfg.conditional and classes < 1:
        raise ValueError(f"--conditional needs a labelled dataset; {cfg.data} has no labels here")
    net = ScoreUNet(in_channels=image_shape[0], n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    dropout=cfg.dropout, attention=cfg.attention, gamma_min=cfg.gamma_min,
                    gamma_max=cfg.gamma_max, num_classes=classes)
    schedule = SCHEDULES[cfg.schedule](cfg.gamma_min, cfg.gamma_max)
    return VDM(net, schedule, image_shape, vocab_size=vocab_size, antithetic=cfg.antithetic,
               prediction=cfg.prediction, weighting=cfg.weighting, sigmoid_bias=cfg.sigmoid_bias,
               num_classes=classes, label_dropout=cfg.label_dropout)


def save(path: Path, state: dict) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: a crash at any
    moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vdm_fast checkpoint (format {FORMAT!r} expected)")
    return state


def check_compatible(state: dict, cfg: TrainConfig, path) -> None:
    """Refuse to resume a run whose model differs from the checkpoint's."""
    saved = state["config"]
    for name in MODEL_FIELDS:
        if saved.get(name) != getattr(cfg, name):
            raise CheckpointError(f"checkpoint {path} was made with {name}={saved.get(name)!r}, but this run "
                                  f"has {name}={getattr(cfg, name)!r}; use the same settings or another --out-dir")


def model_from_checkpoint(path, use_ema: bool = True):
    """``(model, config, state)`` rebuilt from a checkpoint, with its EMA weights by default."""
    state = load(path)
    cfg = resolve(state["config"])
    model = build_model(cfg, tuple(state["image_shape"]), state["vocab_size"], state.get("num_classes", 0))
    model.load_state_dict(state["ema"] if use_ema else state["model"])
    return model, cfg, state


def model_for_cli(path):
    """For the command-line entries: ``model_from_checkpoint``, or exit with the error."""
    try:
        return model_from_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")


__all__ = ["CheckpointError", "build_model", "check_compatible", "load", "model_for_cli", "model_from_checkpoint",
           "save", "to_dict"]
