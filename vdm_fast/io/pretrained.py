"""Weights people can share: a trained VDM as a folder of ``model.safetensors`` and
``config.json`` (the Hugging Face convention), read back without unpickling anything.

``config.json`` holds what rebuilds the model: the ``TrainConfig`` fields the model is made
from (``MODEL_CONFIG_FIELDS``, as ``vdm_fast.config.to_dict`` gives them), ``image_shape``,
``vocab_size``, ``num_classes``, the format tag ``vdm_fast_format``, the writing
``vdm_fast_version``, the training ``step`` and which ``weights`` (ema or model) were exported,
``safetensors_sha256``, the SHA-256 of ``model.safetensors``, and ``config_sha256``, that of
config.json's other entries (``config_digest``: a flipped bit in a float of config.json would
otherwise change the model unseen; edit a config by re-exporting, or reseal it). Loading
(``vdm_fast.io.load_pretrained(folder)``, ``vdm_fast.io.load_model``, or ``--ckpt FOLDER`` of the CLIs) reads
JSON and safetensors only, checks the checksum, and refuses by name a missing, truncated,
foreign (a pickle renamed ``model.safetensors`` included), damaged or mismatched file, and
non-finite weights. Needs the ``export`` extra (``pip install 'vdm_fast[export]'``).
"""

import hashlib
import json
import struct
from pathlib import Path

import torch

from vdm_fast import __version__
from vdm_fast.extras import require
from vdm_fast.io.atomic import write_atomic
from vdm_fast.io.checkpoint import CheckpointError
from vdm_fast.config import TrainConfig, resolve, to_dict
from vdm_fast.factory import build_model

FORMAT = "vdm_fast.pretrained/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The TrainConfig fields a pretrained folder records: those build_model reads, the dataset
# (whose defaults fill the rest), the training loss's T, the samples' guidance and the batch the
# evaluation runs in. Fields not recorded (paths, optimiser, logging) take their defaults on load.
MODEL_CONFIG_FIELDS = ("data", "n_embd", "n_layer", "dropout", "attention", "schedule", "schedule_objective",
                       "gamma_min", "gamma_max", "T", "antithetic", "prediction", "weighting", "sigmoid_bias",
                       "conditional", "label_dropout", "guidance", "batch_size")
# What a loaded config's data_dir says for a dataset other than the bundled digits: the
# exporter's paths are not shared, so the evaluation CLI asks for --data-dir.
UNRECORDED_DATA_DIR = "<not recorded in the pretrained folder: pass --data-dir>"
# The entries of config.json besides the config fields, with their types.
_ENTRIES = {"vdm_fast_format": str, "vdm_fast_version": str, "image_shape": list, "vocab_size": int,
            "num_classes": int, "step": int, "weights": str, "safetensors_sha256": str, "config_sha256": str}
WEIGHT_KINDS = ("ema", "model")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip, pickles


class PretrainedError(CheckpointError):
    """A pretrained folder is missing, damaged, foreign, or does not fit the model its config
    describes."""


def _safetensors():
    """The ``safetensors.torch`` module, or the ``MissingExtra`` that says what to install."""
    require("export", library=True)
    import safetensors.torch

    return safetensors.torch


# ----------------------------------------------------------------------------------------- writing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_model_fits_config(model, cfg: TrainConfig) -> dict:
    """The model's state dict, after checking that ``build_model(cfg)`` makes the same model
    (names, shapes, dtypes, the VDM's settings): a folder that will not load is never written."""
    try:
        rebuilt = build_model(cfg, model.image_shape, model.vocab_size, model.num_classes)
    except (TypeError, ValueError) as err:
        raise PretrainedError(f"the config does not describe a buildable model: {err}") from err
    for attr in ("image_shape", "vocab_size", "num_classes", "antithetic", "prediction", "weighting",
                 "sigmoid_bias", "label_dropout", "schedule_objective"):
        if getattr(model, attr) != getattr(rebuilt, attr):
            raise PretrainedError(f"the model has {attr}={getattr(model, attr)!r} but its config builds "
                                  f"{attr}={getattr(rebuilt, attr)!r}")
    state = model.state_dict()
    expected = rebuilt.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PretrainedError(f"the model's weights differ from those its config builds "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, t in state.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise PretrainedError(f"weight {name} is {t.dtype} {tuple(t.shape)}, but the config builds "
                                  f"{expected[name].dtype} {tuple(expected[name].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PretrainedError(f"weight {name} holds non-finite values; refusing to export it")
    return state


def save_pretrained(model, cfg: TrainConfig, folder, *, step: int = 0, weights: str = "ema",
                    overwrite: bool = False) -> dict:
    """Write ``model`` (a ``VDM`` that ``build_model(cfg, ...)`` makes) to ``folder`` as
    ``model.safetensors`` and ``config.json``; returns the config.json entries written.

    ``step``: the training step of the weights; ``weights``: which of the run's weights they are
    (``"ema"`` or ``"model"``), recorded only. A non-empty existing folder is refused unless
    ``overwrite`` (then only the two files are replaced), and so is a training run's folder
    (it holds ``checkpoint.pt`` and a config.json of its own). Each file is written under a
    temporary name and renamed; the weights go first, so a crash between the two renames leaves
    a folder whose checksum refuses it, never a mismatched model."""
    st = _safetensors()
    folder = Path(folder)
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if folder.exists() and not folder.is_dir():
        raise PretrainedError(f"{folder} exists and is not a folder")
    if (folder / "checkpoint.pt").exists():
        raise PretrainedError(f"refusing to write into {folder}: it is a training run's folder (it holds "
                              "checkpoint.pt and the run's own config.json); choose another folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise PretrainedError(f"{folder} exists and is not empty; choose another folder, or overwrite its "
                              f"{WEIGHTS_NAME} and {CONFIG_NAME} with --force (overwrite=True)")
    state = _check_model_fits_config(model, cfg)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    values = to_dict(cfg)
    config = {"vdm_fast_format": FORMAT, "vdm_fast_version": __version__,
              **{name: values[name] for name in MODEL_CONFIG_FIELDS},
              "image_shape": list(model.image_shape), "vocab_size": int(model.vocab_size),
              "num_classes": int(model.num_classes), "step": int(step), "weights": weights}
    # One metadata entry, the ecosystem's "pt": safetensors stores metadata in hash order, so a
    # second entry would make two exports of one checkpoint differ byte for byte.
    metadata = {"format": "pt"}
    weights_path, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    digest = {}

    def write_weights(tmp: Path) -> None:
        st.save_file(tensors, str(tmp), metadata=metadata)
        digest["sha256"] = _sha256_file(tmp)

    write_atomic(weights_path, write_weights)
    config["safetensors_sha256"] = digest["sha256"]
    config["config_sha256"] = config_digest(config)
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    write_atomic(config_path, lambda tmp: tmp.write_text(text))
    return config


# ----------------------------------------------------------------------------------------- reading


def config_digest(config: dict) -> str:
    """The SHA-256 of a config.json's entries but ``config_sha256``, in a canonical JSON
    encoding (sorted keys, no spaces)."""
    entries = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode("utf-8")).hexdigest()


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise PretrainedError(f"{path} is missing: a pretrained folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")

    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        config = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from err
    if not isinstance(config, dict):
        raise PretrainedError(f"{path} is invalid: a JSON object expected, got {type(config).__name__}")
    tag = config.get("vdm_fast_format")
    if tag is None:
        raise PretrainedError(f"{path} is not a vdm_fast pretrained config (it has no 'vdm_fast_format' entry; "
                              f"{FORMAT!r} expected)")
    if tag != FORMAT:
        raise PretrainedError(f"{path} has format tag {tag!r}; this vdm_fast ({__version__}) reads {FORMAT!r}")
    if config.get("config_sha256") != config_digest(config):
        raise PretrainedError(f"{path} is damaged or was edited: its entries do not match its config_sha256 "
                              "(re-export the checkpoint to change a setting)")
    for key, kind in _ENTRIES.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise PretrainedError(f"{path} is invalid: it lacks a valid {key!r} entry ({kind.__name__} expected)")
    unknown = sorted(set(config) - set(_ENTRIES) - set(MODEL_CONFIG_FIELDS))
    missing = sorted(set(MODEL_CONFIG_FIELDS) - set(config))
    if unknown or missing:
        raise PretrainedError(f"{path} is invalid: unknown entries {unknown}, missing entries {missing}")
    shape = config["image_shape"]
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise PretrainedError(f"{path} is invalid: image_shape {shape!r} ((C, H, W) of positive integers expected)")
    if config["vocab_size"] < 2 or config["num_classes"] < 0 or config["step"] < 0:
        raise PretrainedError(f"{path} is invalid: vocab_size must be >= 2, num_classes and step >= 0")
    if config["weights"] not in WEIGHT_KINDS:
        raise PretrainedError(f"{path} is invalid: weights must be one of {WEIGHT_KINDS}, got {config['weights']!r}")
    sha = config["safetensors_sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise PretrainedError(f"{path} is invalid: safetensors_sha256 must be 64 lowercase hex digits")
    return config


def _parse_frame(path: Path, data: bytes) -> dict:
    """The header of a safetensors file, after checking its framing: an 8-byte little-endian
    header length, a JSON object header, then exactly the tensor bytes the header describes."""
    looks_pickled = data.startswith(_PICKLE_MAGIC)

    def foreign(why: str) -> PretrainedError:
        if looks_pickled:
            return PretrainedError(f"{path} is not a safetensors file: it is a pickle or torch.save file ({why}); "
                                   "vdm_fast never unpickles a pretrained folder's weights. Export a checkpoint "
                                   "with vdm-fast export")
        return PretrainedError(f"{path} is not a safetensors file, or is truncated ({why})")

    if len(data) < 8:
        raise foreign(f"only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise foreign(f"its header length field says {n} bytes, but only {len(data) - 8} follow it")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise foreign(f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise foreign("its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise foreign(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    held = len(data) - 8 - n
    if held < end:
        raise PretrainedError(f"{path} is truncated: its header describes {end} bytes of tensor data, but the file "
                              f"holds {held}")
    if held > end:
        raise PretrainedError(f"{path} is damaged: {held - end} bytes follow the tensor data its header describes")
    return header


def _read_weights(path: Path, sha256: str) -> dict:
    st = _safetensors()
    if not path.is_file():
        raise PretrainedError(f"{path} is missing: a pretrained folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = path.read_bytes()  # once: the bytes checked are the bytes parsed
    _parse_frame(path, data)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise PretrainedError(f"{path} is damaged or was replaced: its SHA-256 does not match the "
                              f"safetensors_sha256 in {path.parent / CONFIG_NAME}")
    try:
        return st.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError, and others for bad dtypes
        raise PretrainedError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err


def _check_tensors(path: Path, expected: dict, tensors: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise PretrainedError(f"{path} does not fit the model its {CONFIG_NAME} describes: missing tensors "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected tensors "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise PretrainedError(f"{path}: tensor {name} has shape {tuple(got.shape)}, the model its "
                                  f"{CONFIG_NAME} describes needs {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise PretrainedError(f"{path}: tensor {name} has dtype {got.dtype}, the model its {CONFIG_NAME} "
                                  f"describes needs {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise PretrainedError(f"{path}: tensor {name} holds non-finite values (NaN or infinity)")


def load_pretrained(folder):
    """``(model, cfg, info)`` from a folder ``save_pretrained`` wrote: the ``VDM`` in eval mode
    on the CPU, its resolved ``TrainConfig`` (fields not recorded take their defaults; a dataset
    other than digits gets ``data_dir = UNRECORDED_DATA_DIR``), and ``info``, a dict with the
    keys the CLIs read from a checkpoint's state (``step``, ``config``, ``image_shape``,
    ``vocab_size``, ``num_classes``) plus ``format``, ``vdm_fast_version``, ``weights``,
    ``sha256`` and ``folder``. Reads JSON and safetensors only; raises ``PretrainedError``
    naming the file and the fault, or ``vdm_fast.extras.MissingExtra`` without safetensors."""
    _safetensors()
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedError(f"no pretrained folder at {folder}")
    if not (folder / WEIGHTS_NAME).exists() and (folder / "checkpoint.pt").is_file():
        raise PretrainedError(f"{folder} is a training run's folder, not an exported one: pass "
                              f"{folder / 'checkpoint.pt'}, or export it with vdm-fast export")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = _read_config(config_path)
    fields = {name: config[name] for name in MODEL_CONFIG_FIELDS}
    if fields["data"] != "digits":
        fields["data_dir"] = UNRECORDED_DATA_DIR
    try:
        cfg = resolve(fields)
        model = build_model(cfg, tuple(config["image_shape"]), config["vocab_size"], config["num_classes"])
    except (TypeError, ValueError) as err:
        raise PretrainedError(f"{config_path} is invalid: {err}") from err
    tensors = _read_weights(weights_path, config["safetensors_sha256"])
    _check_tensors(weights_path, model.state_dict(), tensors)
    model.load_state_dict(tensors)
    model.eval()
    info = {"format": FORMAT, "folder": str(folder), "step": config["step"], "config": to_dict(cfg),
            "image_shape": list(config["image_shape"]), "vocab_size": config["vocab_size"],
            "num_classes": config["num_classes"], "weights": config["weights"],
            "vdm_fast_version": config["vdm_fast_version"], "sha256": config["safetensors_sha256"]}
    return model, cfg, info


__all__ = ["CONFIG_NAME", "FORMAT", "MODEL_CONFIG_FIELDS", "PretrainedError", "UNRECORDED_DATA_DIR", "WEIGHTS_NAME",
           "config_digest", "load_pretrained", "save_pretrained"]

