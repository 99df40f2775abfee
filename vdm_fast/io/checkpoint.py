"""Checkpoints of training runs: written atomically, finite, checksummed; read back without
running any code from the file.

A checkpoint is a ``torch.save`` file of plain data (dicts, lists, numbers, strings, tensors)
that ``torch.load(..., weights_only=True)`` reads: no pickled Python object is ever executed.
It carries a SHA-256 of its own contents (``sha256``), checked on every load, so a flipped bit
or a truncated copy is refused by name instead of loading changed weights. A state with a
non-finite parameter, EMA value or optimiser moment is never written.
"""

import hashlib
import pickle
from pathlib import Path

import torch

from vdm_fast.config import MODEL_FIELDS, TrainConfig, to_dict
from vdm_fast.io.atomic import write_atomic

# Version 2 added the content checksum and the weights-only format; version 1 files are refused.
FORMAT = "vdm_fast.checkpoint/2"
# What every checkpoint holds, with the type of each entry; and what resuming a run also needs.
_REQUIRED = {"config": dict, "step": int, "model": dict, "ema": dict, "image_shape": list, "vocab_size": int,
             "num_classes": int}
_RESUMABLE = {"skipped_steps": int, "optimizer": dict}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, unsafe, or does not belong to this run."""


def _digest(value, h) -> None:
    """Feed a canonical encoding of plain data and tensors into the hash ``h``: the type of
    every node, dict entries in key order, tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _digest(key, h)
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, h)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def digest(state: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "sha256"}, h)
    return h.hexdigest()


def _tensors(value, prefix=""):
    """``(name, tensor)`` of every tensor in nested plain data."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}[{i}]")


def first_non_finite(state: dict):
    """The name of the first floating tensor of the model, EMA or optimiser that holds a NaN or
    an infinity (None when all are finite)."""
    for key in ("model", "ema", "optimizer"):
        for name, t in _tensors(state.get(key, {}), key):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
    return None


def save(path: Path, state: dict) -> None:
    """Write ``state`` atomically (``write_atomic``) with its format and checksum. A state with a
    non-finite tensor is refused (``CheckpointError``) and the old checkpoint stays."""
    path = Path(path)
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"refusing to write {path}: {bad} holds non-finite values")
    state = {"format": FORMAT, **state}
    state["sha256"] = digest(state)
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load(path: Path) -> dict:
    """The state saved at ``path``, after checking its format, its checksum and its entries."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a pickled object: the way a crafted file runs code
            raise CheckpointError(f"refusing to load {path}: it holds Python objects, not just tensors and plain "
                                  "data, and loading it could run code (vdm_fast never unpickles objects)") from err
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable (UnpicklingError: {err})") from err
    except Exception as err:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("format"), str):
        raise CheckpointError(f"{path} is not a vdm_fast checkpoint (format {FORMAT!r} expected)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}; this vdm_fast reads {FORMAT!r} "
                              "(version 1 files carry no checksum and are not loaded)")
    if state.get("sha256") != digest(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match their SHA-256 checksum")
    _check_entries(state, _REQUIRED, path)
    shape = state["image_shape"]
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise CheckpointError(f"checkpoint {path} has an invalid image_shape {shape!r} ((C, H, W) expected)")
    if state["vocab_size"] < 2 or state["num_classes"] < 0 or state["step"] < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid vocab_size, num_classes or step")
    return state


def _check_entries(state: dict, entries: dict, path) -> None:
    for key, kind in entries.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"checkpoint {path} lacks a valid {key!r} entry ({kind.__name__} expected)")


def verify_compatible(state: dict, cfg: TrainConfig, path, image_shape, vocab_size: int) -> None:
    """Refuse to resume a run whose model or data differs from the checkpoint's, or from a
    checkpoint that cannot resume (no optimiser state)."""
    _check_entries(state, _RESUMABLE, path)
    saved = state["config"]
    for name in MODEL_FIELDS:
        if saved.get(name) != getattr(cfg, name):
            raise CheckpointError(f"checkpoint {path} was made with {name}={saved.get(name)!r}, but this run "
                                  f"has {name}={getattr(cfg, name)!r}; use the same settings or another --out-dir")
    for name, ours in (("image_shape", list(image_shape)), ("vocab_size", vocab_size)):
        if state[name] != ours:
            raise CheckpointError(f"checkpoint {path} was made for data with {name}={state[name]!r}, but this "
                                  f"run's data has {name}={ours!r}")


def verify_weights(expected: dict, weights: dict, path, what: str) -> None:
    """Refuse by name ``weights`` whose names or shapes differ from ``expected``'s
    (``{name: tensor}``)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: the {what} weights do not fit this model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor) or t.shape != expected[name].shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"checkpoint {path}: {what} weight {name} has shape {got}, "
                                  f"this model needs {tuple(expected[name].shape)}")


def load_weights(module: torch.nn.Module, weights: dict, path, what: str) -> None:
    """``module.load_state_dict(weights)`` with a mismatch refused by name."""
    verify_weights(module.state_dict(), weights, path, what)
    module.load_state_dict(weights)


__all__ = ["CheckpointError", "digest", "first_non_finite", "load", "load_weights", "save", "to_dict",
           "verify_compatible", "verify_weights"]
