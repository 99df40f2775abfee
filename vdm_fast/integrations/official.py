"""The official VDM checkpoints (google-research/vdm, JAX/Flax) as vdm_fast pretrained folders.

    vdm-fast convert CKPT.flax --out FOLDER [--data cifar10] [--image-size 32]
                     [--gamma-min -13.3] [--gamma-max 5.0] [--tree ema_params] [--force]

The official trainer saves ``checkpoints-0/ckpt-N.flax`` (``CKPT`` may be that folder: its
highest ``N`` is taken): ``flax.serialization.to_bytes`` of its ``TrainState``, a msgpack map of
``step``, ``params``, ``ema_params`` and ``opt_state`` whose arrays are msgpack extension type 1
holding ``(shape, dtype name, C-order bytes)``. This module reads it with ``msgpack`` alone (no
JAX, nothing unpickled): a file that is not msgpack or is truncated is refused by name. ``--tree``
picks the weights: ``ema_params`` (the default, what the official evaluation and sampling use) or
``params``; each of its arrays must have a dtype name of an allow-list and bytes that fill its
shape exactly. The other tree and ``opt_state`` are not read beyond their msgpack framing.

The configuration is read from the parameters' shapes: the width ``n_embd`` from ``conv_in``,
``n_layer`` from the ``down.block_i``, attention after every block (the official
``with_attention``) from ``down.attn_i`` / ``up.attn_i``, the schedule from ``gamma``
(``w``, ``b``: the learned scalar; ``l1``, ``l2``, ``l3``: the monotone network; none: the fixed
line). What the file does not hold comes from the flags: the image size, and ``gamma_min`` /
``gamma_max`` of the official config (``configs/*.py``), which normalise the score network's time
input (both -13.3 and 5.0 in every official config). Every parameter is placed by name (flax's
kernels ``[in, out]`` and ``[kh, kw, in, out]`` become torch's ``[out, in]`` and
``[out, in, kh, kw]``, GroupNorm ``scale`` the weight, ``q``, ``k``, ``v`` the fused ``qkv``);
an unknown or missing parameter, or a shape no configuration has, is refused by name. The model
is vdm_fast's ``build_model`` of the configuration found, with the file's weights, written by
``vdm_fast.io.save_pretrained``; nothing is written to ``--out`` unless all of it succeeded.
``docs/official.md`` says how to evaluate and sample the result, and how the official numbers
were computed.

The official score network takes a scalar ``conditioning`` per image besides the time (the
augmented CIFAR-10 model's augmentation flag, 0 at evaluation and sampling); vdm_fast's
``ScoreUNet`` takes it as ``conditioning`` (default 0), and ``VDM.forward`` passes it on.
"""

import argparse
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from vdm_fast.config import resolve
from vdm_fast.extras import require
from vdm_fast.factory import build_model
from vdm_fast.io import PretrainedError, save_pretrained
from vdm_fast.io.pretrained import UNRECORDED_DATA_DIR

TREES = ("ema_params", "params")
# The datasets a converted model can be evaluated on, with their image size.
DATASETS = {"cifar10": 32, "imagenet32": 32, "imagenet64": 64, "npy": None}
# flax's dtype names that an array of a checkpoint may have, as little-endian numpy dtypes
# (flax writes the host's order, little-endian on every machine the official code ran on);
# bfloat16 is read as its 16 high bits of a float32.
DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "<u2", "bool": "|b1",
          "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
          "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}
# flax's msgpack extension types of arrays and of numpy scalars (stored as 0-d arrays); its
# type 2, complex numbers, holds no parameter.
EXT_NDARRAY, EXT_NPSCALAR = 1, 3
# The official monotone network's width (NoiseSchedule_NNet's n_features; no config sets it).
NNET_FEATURES = 1024
IMAGE_CHANNELS = 3  # the official encoder and decoder are written for RGB
FOURIER_CHANNELS = 4 * IMAGE_CHANNELS  # sin and cos at 2 frequencies of each channel


class OfficialCheckpointError(ValueError):
    """An official checkpoint is missing, damaged, foreign, or holds a model vdm_fast does not build."""


# ----------------------------------------------------------------------------------------- reading


def find_checkpoint(path) -> Path:
    """``path`` itself, or the ``ckpt-N.flax`` of highest ``N`` in the folder ``path``."""
    path = Path(path)
    if path.is_dir():
        found = [(int(m.group(1)), p) for p in path.iterdir() if (m := re.fullmatch(r"ckpt-(\d+)\.flax", p.name))]
        if not found:
            raise OfficialCheckpointError(f"{path} holds no ckpt-N.flax file (the official trainer's "
                                          "checkpoints-0 folder expected)")
        return max(found)[1]
    if not path.is_file():
        raise OfficialCheckpointError(f"{path} does not exist")
    return path


def _decode_array(where: str, payload: bytes) -> np.ndarray:
    """flax's array encoding: msgpack ``(shape, dtype name, C-order bytes)``; ``where`` names it."""
    import msgpack

    try:
        fields = msgpack.unpackb(payload, raw=True)
    except (ValueError, msgpack.UnpackException) as err:
        raise OfficialCheckpointError(f"{where} is a damaged array ({type(err).__name__}: {err})") from None
    if not isinstance(fields, list) or len(fields) != 3:
        raise OfficialCheckpointError(f"{where} is not an array as flax writes it, (shape, dtype, bytes)")
    shape, name, buffer = fields
    if (not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise OfficialCheckpointError(f"{where} has shape {shape!r}, not a list of sizes")
    name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    if name not in DTYPES:
        raise OfficialCheckpointError(f"{where} has dtype {name!r}, not one of {sorted(DTYPES)}")
    dtype = np.dtype(DTYPES[name])
    expected = math.prod(shape) * dtype.itemsize
    if not isinstance(buffer, bytes) or len(buffer) != expected:
        got = len(buffer) if isinstance(buffer, bytes) else type(buffer).__name__
        raise OfficialCheckpointError(f"{where}: a {name} array of shape {tuple(shape)} needs {expected} bytes, "
                                      f"the file holds {got}")
    array = np.frombuffer(buffer, dtype).reshape(shape)
    if name == "bfloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _array(where: str, value):
    """An array entry of the checkpoint (flax's extension types 1 and 3), decoded."""
    import msgpack

    if isinstance(value, msgpack.ExtType) and value.code in (EXT_NDARRAY, EXT_NPSCALAR):
        return _decode_array(where, value.data)
    if isinstance(value, msgpack.ExtType):
        raise OfficialCheckpointError(f"{where} is msgpack extension type {value.code}, not one of flax's arrays")
    return value


def read_checkpoint(path) -> dict:
    """The state dict a flax checkpoint holds: nested dicts whose arrays are still msgpack
    ``ExtType`` entries (``flat_arrays`` decodes a tree of them, checking each by name); nothing
    is run from the file. ``OfficialCheckpointError`` naming the file for anything but msgpack."""
    require("official", library=True)
    import msgpack

    path = Path(path)
    try:
        state = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise OfficialCheckpointError(f"{path} is not a flax checkpoint (msgpack), or is truncated "
                                      f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise OfficialCheckpointError(f"{path} is not a flax checkpoint: a msgpack map expected, got "
                                      f"{type(state).__name__}")
    return state


def flat_arrays(path: Path, tree, name: str) -> dict:
    """``{"a/b/c": array}`` of the tree ``name`` (a dict of dicts with array leaves), paths relative
    to it, every array decoded and checked."""
    flat = {}

    def walk(node, prefix: str) -> None:
        node = _array(f"{path}: {prefix}", node)
        if isinstance(node, np.ndarray):
            flat[prefix[len(name) + 1:]] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}")
        else:
            raise OfficialCheckpointError(f"{path}: {prefix} is a {type(node).__name__}, not an array or a "
                                          "dict of parameters")

    walk(tree, name)
    return flat


def _step(path: Path, state: dict) -> int:
    if "step" not in state:
        raise OfficialCheckpointError(f"{path} has no 'step' entry: an official checkpoint holds step, params, "
                                      "ema_params and opt_state")
    step = _array(f"{path}: step", state["step"])
    value = np.asarray(step) if isinstance(step, (int, np.integer, np.ndarray)) else None
    if value is None or value.shape != () or value.dtype.kind not in "iu" or value < 0:
        raise OfficialCheckpointError(f"{path}: its 'step' entry is {step!r}, not a training step (an "
                                      "integer >= 0)")
    return int(value)


# ----------------------------------------------------------------------------------------- mapping


def _official_layout(fields: dict) -> dict:
    """For each tensor of vdm_fast's model of ``fields``: ``(layout, official parameters)``, the
    official parameters (paths in the params tree) it is made of, and how (``"dense"``: flax
    ``[in, out]`` kernels, ``"conv"``: ``[kh, kw, in, out]`` kernels, ``"vector"``: as stored;
    several parameters are concatenated, q, k and v into the fused ``qkv``)."""
    layout = {}

    def dense(ours: str, theirs: str, bias: bool = True) -> None:
        layout[f"{ours}.weight"] = ("dense", (f"{theirs}/kernel",))
        if bias:
            layout[f"{ours}.bias"] = ("vector", (f"{theirs}/bias",))

    def conv(ours: str, theirs: str) -> None:
        layout[f"{ours}.weight"] = ("conv", (f"{theirs}/kernel",))
        layout[f"{ours}.bias"] = ("vector", (f"{theirs}/bias",))

    def norm(ours: str, theirs: str) -> None:
        layout[f"{ours}.weight"] = ("vector", (f"{theirs}/scale",))
        layout[f"{ours}.bias"] = ("vector", (f"{theirs}/bias",))

    def resnet(ours: str, theirs: str, shortcut: bool) -> None:
        norm(f"{ours}.norm1", f"{theirs}/GroupNorm_0")
        conv(f"{ours}.conv1", f"{theirs}/conv1")
        dense(f"{ours}.cond_proj", f"{theirs}/cond_proj", bias=False)
        norm(f"{ours}.norm2", f"{theirs}/GroupNorm_1")
        conv(f"{ours}.conv2", f"{theirs}/conv2")
        if shortcut:  # the up blocks take the skip connection's channels too
            dense(f"{ours}.nin_shortcut", f"{theirs}/nin_shortcut")

    def attention(ours: str, theirs: str) -> None:
        norm(f"{ours}.norm", f"{theirs}/GroupNorm_0")
        layout[f"{ours}.qkv.weight"] = ("dense", tuple(f"{theirs}/{n}/kernel" for n in "qkv"))
        layout[f"{ours}.qkv.bias"] = ("vector", tuple(f"{theirs}/{n}/bias" for n in "qkv"))
        dense(f"{ours}.proj_out", f"{theirs}/proj_out")

    every = fields["attention"] == "all"
    net, unet = "score_net", "score_model"
    dense(f"{net}.dense0", f"{unet}/dense0")
    dense(f"{net}.dense1", f"{unet}/dense1")
    conv(f"{net}.conv_in", f"{unet}/conv_in")
    for i in range(fields["n_layer"]):
        resnet(f"{net}.down.{i}", f"{unet}/down.block_{i}", shortcut=False)
        if every:
            attention(f"{net}.down_attn.{i}", f"{unet}/down.attn_{i}")
    resnet(f"{net}.mid_block1", f"{unet}/mid.block_1", shortcut=False)
    attention(f"{net}.mid_attn", f"{unet}/mid.attn_1")
    resnet(f"{net}.mid_block2", f"{unet}/mid.block_2", shortcut=False)
    for i in range(fields["n_layer"] + 1):
        resnet(f"{net}.up.{i}", f"{unet}/up.block_{i}", shortcut=True)
        if every:
            attention(f"{net}.up_attn.{i}", f"{unet}/up.attn_{i}")
    norm(f"{net}.norm_out", f"{unet}/GroupNorm_0")
    conv(f"{net}.conv_out", f"{unet}/conv_out")
    if fields["schedule"] == "scalar":
        layout["schedule.w"] = ("vector", ("gamma/w",))
        layout["schedule.b"] = ("vector", ("gamma/b",))
    elif fields["schedule"] == "nnet":
        for i, bias in ((1, True), (2, True), (3, False)):
            layout[f"schedule.w{i}"] = ("dense", (f"gamma/l{i}/kernel",))
            if bias:
                layout[f"schedule.b{i}"] = ("vector", (f"gamma/l{i}/bias",))
    return layout


def _official_shape(layout: str, ours: tuple, parts: int) -> tuple:
    """The shape each of ``parts`` official parameters has, that make a tensor of shape ``ours``."""
    if layout == "dense":
        return (ours[1], ours[0] // parts)
    if layout == "conv":
        return (ours[2], ours[3], ours[1], ours[0] // parts)
    return (ours[0] // parts,)


def _to_torch(layout: str, arrays: list) -> torch.Tensor:
    if layout == "dense":
        arrays = [a.T for a in arrays]
    elif layout == "conv":
        arrays = [a.transpose(3, 2, 0, 1) for a in arrays]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32))


def infer_fields(path: Path, tree: str, params: dict) -> dict:
    """The configuration (``n_embd``, ``n_layer``, ``attention``, ``schedule``) of the flat
    parameters ``params`` (paths relative to the tree ``tree``)."""
    where = f"{path}: {tree}"
    conv_in = params.get("score_model/conv_in/kernel")
    if conv_in is None:
        top = sorted({name.split("/")[0] for name in params})
        raise OfficialCheckpointError(f"{where} holds no score_model/conv_in/kernel: not an official VDM's "
                                      f"parameters (its entries begin with {top})")
    in_channels = IMAGE_CHANNELS + FOURIER_CHANNELS
    if conv_in.ndim != 4 or conv_in.shape[:3] != (3, 3, in_channels) or conv_in.shape[3] % 32 or not conv_in.shape[3]:
        raise OfficialCheckpointError(
            f"{where}/score_model/conv_in/kernel has shape {conv_in.shape}; vdm_fast builds (3, 3, {in_channels}, "
            f"n_embd): {IMAGE_CHANNELS} image channels and their {FOURIER_CHANNELS} Fourier features in, n_embd a "
            "multiple of 32 out (the official with_fourier_features=True, GroupNorm's 32 groups)")
    blocks = [int(m.group(1)) for name in params if (m := re.match(r"score_model/down\.block_(\d+)/", name))]
    attention = any(re.match(r"score_model/(down|up)\.attn_\d+/", name) for name in params)
    gamma = {name.split("/")[1] for name in params if name.startswith("gamma/")}
    if not gamma:
        schedule = "fixed"
    elif gamma <= {"w", "b"}:
        schedule = "scalar"
    elif gamma <= {"l1", "l2", "l3"}:
        schedule = "nnet"
        l2 = params.get("gamma/l2/kernel")
        if l2 is not None and (l2.ndim != 2 or l2.shape[1] != NNET_FEATURES):
            raise OfficialCheckpointError(f"{where}/gamma/l2/kernel has shape {l2.shape}; vdm_fast builds the "
                                          f"official monotone network of (1, {NNET_FEATURES}) features")
    else:
        raise OfficialCheckpointError(f"{where}/gamma holds {sorted(gamma)}: neither the learned scalar schedule "
                                      "(w, b) nor the monotone network (l1, l2, l3)")
    return {"n_embd": int(conv_in.shape[3]), "n_layer": max(blocks) + 1 if blocks else 0,
            "attention": "all" if attention else "middle", "schedule": schedule}


def load_weights(path: Path, tree: str, params: dict, model, fields: dict) -> None:
    """Put the official parameters ``params`` (flat) into ``model``, vdm_fast's model of the
    configuration ``fields``, every one by name."""
    where = f"{path}: {tree}"
    layout = _official_layout(fields)
    expected = {name for _, names in layout.values() for name in names}
    unknown, missing = sorted(set(params) - expected), sorted(expected - set(params))
    if unknown:
        raise OfficialCheckpointError(f"{where} holds parameters the official model of its configuration has "
                                      f"not: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if missing:
        raise OfficialCheckpointError(f"{where} lacks parameters of the official model of its configuration: "
                                      f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    ours = model.state_dict()
    state = {}
    for name, (kind, sources) in layout.items():
        want = _official_shape(kind, tuple(ours[name].shape), len(sources))
        arrays = []
        for source in sources:
            array = params[source]
            if array.shape != want:
                raise OfficialCheckpointError(f"{where}/{source} has shape {array.shape}, the official model of "
                                              f"the configuration its other parameters give needs {want}")
            if array.dtype.name not in ("float16", "float32", "float64") or (
                    array.dtype == np.float64 and not np.array_equal(array.astype(np.float32), array)):
                raise OfficialCheckpointError(
                    f"{where}/{source} is {array.dtype}: parameters must be floating point and exact in "
                    "float32 (vdm_fast's models are float32; float64 values would be rounded)")
            arrays.append(array)
        state[name] = _to_torch(kind, arrays)
    model.load_state_dict(state)


def convert(ckpt, *, data: str = "cifar10", image_size=None, gamma_min: float = -13.3, gamma_max: float = 5.0,
            tree: str = "ema_params"):
    """``(model, cfg, step, path)``: the official checkpoint ``ckpt`` (a ``ckpt-N.flax`` or its
    folder) as vdm_fast's ``VDM`` (float32, eval mode) and the ``TrainConfig`` that builds it,
    with the training step and the file read."""
    if data not in DATASETS:
        raise ValueError(f"data must be one of {tuple(DATASETS)}, got {data!r}")
    if tree not in TREES:
        raise ValueError(f"tree must be one of {TREES}, got {tree!r}")
    size = image_size if image_size is not None else DATASETS[data]
    if size is None:
        raise ValueError(f"data {data!r} has no fixed image size: give image_size (--image-size)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive integer, got {size!r}")
    if DATASETS[data] not in (None, size):
        raise ValueError(f"{data} images are {DATASETS[data]}x{DATASETS[data]}, not {size}x{size}")
    path = find_checkpoint(ckpt)
    state = read_checkpoint(path)
    if tree not in state:
        raise OfficialCheckpointError(f"{path} holds no {tree!r} tree (its entries: {sorted(map(str, state))}); "
                                      f"an official checkpoint holds {' and '.join(TREES)}")
    step = _step(path, state)
    params = flat_arrays(path, state[tree], tree)
    fields = infer_fields(path, tree, params)
    cfg = resolve({"data": data, "data_dir": UNRECORDED_DATA_DIR, "gamma_min": gamma_min,
                   "gamma_max": gamma_max, **fields})
    model = build_model(cfg, (IMAGE_CHANNELS, size, size), vocab_size=256)
    load_weights(path, tree, params, model, fields)
    return model.eval(), cfg, step, path


def write(model, cfg, out, *, step: int, tree: str, force: bool = False) -> dict:
    """``save_pretrained`` into ``out``. A new folder is written beside it under a temporary name
    and renamed into place, so a failure leaves no ``out`` at all; an existing folder gets
    save_pretrained's own checks (empty, or ``force``) and its two atomic file writes."""
    out = Path(out)
    weights = "ema" if tree == "ema_params" else "model"
    if out.exists():  # save_pretrained's checks (not empty, a run's folder) and its atomic files
        return save_pretrained(model, cfg, out, step=step, weights=weights, overwrite=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        config = save_pretrained(model, cfg, staging, step=step, weights=weights, overwrite=True)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast convert`` under
    the ``vdm-fast`` command)."""
    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.integrations.official",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="the official trainer's ckpt-N.flax, or its checkpoints-0 folder (highest N)")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    parser.add_argument("--data", choices=tuple(DATASETS), default="cifar10",
                        help="the dataset the model is evaluated on (recorded in config.json; default: cifar10)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image height and width (not in the file; default: the dataset's, 32 for cifar10)")
    parser.add_argument("--gamma-min", type=float, default=-13.3,
                        help="the official config's gamma_min (not in the file; default: -13.3, every official config)")
    parser.add_argument("--gamma-max", type=float, default=5.0,
                        help="the official config's gamma_max (not in the file; default: 5.0, every official config)")
    parser.add_argument("--tree", choices=TREES, default="ema_params",
                        help="the weights: ema_params (default, what the official evaluation uses) or params")
    parser.add_argument("--force", action="store_true",
                        help="overwrite model.safetensors and config.json in a non-empty existing folder")
    args = parser.parse_args(argv)
    require("official")
    try:
        model, cfg, step, path = convert(args.ckpt, data=args.data, image_size=args.image_size,
                                         gamma_min=args.gamma_min, gamma_max=args.gamma_max, tree=args.tree)
        write(model, cfg, args.out, step=step, tree=args.tree, force=args.force)
    except (OfficialCheckpointError, PretrainedError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}")
    count = sum(p.numel() for p in model.score_net.parameters())
    print(f"read {path}: step {step}, the {args.tree} tree")
    print(f"configuration: n_embd={cfg.n_embd} n_layer={cfg.n_layer} attention={cfg.attention} "
          f"schedule={cfg.schedule} gamma_min={cfg.gamma_min} gamma_max={cfg.gamma_max}, "
          f"images {tuple(model.image_shape)}")
    print(f"score network: {count:,} parameters (schedule: {sum(p.numel() for p in model.schedule.parameters())})")
    print(f"wrote {args.out}; evaluate it with: vdm-fast evaluate --ckpt {args.out} --data-dir DATA_DIR")


__all__ = ["OfficialCheckpointError", "convert", "find_checkpoint", "flat_arrays", "infer_fields", "load_weights",
           "main", "read_checkpoint", "write"]

if __name__ == "__main__":
    main()
