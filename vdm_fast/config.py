"""Configuration of a training run: one dataclass, every field a CLI flag, optionally a YAML or
JSON file and a named preset underneath (flags override the file, the file the preset, the
preset the dataset's defaults)."""

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from vdm_fast import backend
from vdm_fast.nn.schedule import SCHEDULES
from vdm_fast.nn.vdm import SCHEDULE_OBJECTIVES
from vdm_fast.diffusion.parameterization import PREDICTIONS
from vdm_fast.diffusion.weighting import WEIGHTINGS


@dataclass
class TrainConfig:
    # data
    data: str = field(default="digits", metadata={"help": "digits | cifar10 | imagenet32 | imagenet64 | npy"})
    data_dir: str = field(default="", metadata={"help": "dataset file or folder (all but digits)"})
    out_dir: str = field(default="runs/vdm", metadata={"help": "run folder: config, metrics, checkpoints, samples"})
    # model (None: the dataset's default, see DATASET_DEFAULTS)
    n_embd: Optional[int] = field(default=None, metadata={"help": "U-Net width"})
    n_layer: Optional[int] = field(default=None, metadata={"help": "ResNet blocks down (n_layer + 1 up)"})
    dropout: Optional[float] = field(default=None, metadata={"help": "dropout in the ResNet blocks"})
    attention: str = field(default="middle", metadata={"help": "middle | all"})
    schedule: str = field(default="scalar", metadata={"help": "noise schedule: fixed | scalar | nnet"})
    schedule_objective: str = field(default="elbo", metadata={
        "help": "what the schedule descends: elbo | variance (nnet only: endpoints pinned and on the bound, the "
                "network on the variance of the diffusion loss; continuous time)"})
    gamma_min: Optional[float] = field(default=None, metadata={"help": "initial gamma(0)"})
    gamma_max: Optional[float] = field(default=None, metadata={"help": "initial gamma(1)"})
    T: int = field(default=0, metadata={"help": "diffusion loss: 0 continuous time, else T steps"})
    antithetic: bool = field(default=True, metadata={"help": "antithetic (low-discrepancy) times"})
    ops: str = field(default="auto", metadata={
        "help": "auto | reference: the ops' backend (reference: plain PyTorch, for A/B runs)"})
    prediction: str = field(default="eps", metadata={"help": "network target: eps | x | v | score"})
    weighting: str = field(default="elbo", metadata={"help": "training objective: elbo | sigmoid | eps_mse"})
    sigmoid_bias: float = field(default=0.0, metadata={"help": "b of the sigmoid weighting sigmoid(b - lambda)"})
    conditional: bool = field(default=False, metadata={"help": "class-conditional model (needs labels)"})
    label_dropout: float = field(default=0.1, metadata={"help": "share of labels dropped (classifier-free)"})
    guidance: float = field(default=0.0, metadata={"help": "guidance scale of the final samples"})
    # optimisation
    steps: Optional[int] = field(default=None, metadata={"help": "optimiser steps"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "global batch (split over processes)"})
    lr: Optional[float] = field(default=None, metadata={"help": "peak learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    lr_decay: str = field(default="none", metadata={
        "help": "none | cosine | linear: after the warm-up, decay the learning rate to 0 at the last step"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases)"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    ema: Optional[float] = field(default=None, metadata={"help": "EMA decay of the weights"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many non-finite steps in a row"})
    seed: int = field(default=0, metadata={"help": "seed of data order, noise and initialisation"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    bf16: bool = field(default=True, metadata={
        "help": "bf16 autocast of the score network (only) in training, where the device multiplies bf16 natively: "
                "CUDA, or a CPU with AVX512-BF16 or AMX (elsewhere float32); the final test bpd is float32"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model (score network, schedule and bound: one graph, each fused op one node in "
                "it; whole-graph unless dropout > 0, the variance objective or torchrun need breaks); the first "
                "step, compilation included, is timed on stderr. Off by default: on the CPUs measured it gains nothing "
                "measurable over eager and takes minutes to compile (benchmarks/RESULTS.md, 'The compiled step on "
                "a CPU')"})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "CUDA only: capture the whole training step (forward, backward, clipping, AdamW, EMA) as one CUDA "
                "graph after 3 eager steps and replay it with static inputs; where a step cannot be captured "
                "(dropout > 0, torchrun, a host read or a batch of another shape) the run says so once and steps "
                "eagerly"})
    dist_timeout: float = field(default=600.0, metadata={
        "help": "torchrun runs: seconds a collective waits for the other processes (and a signalled stop may "
                "take) before this process gives up and ends the job"})
    # logging, checkpoints, evaluation
    log_every: int = field(default=10, metadata={"help": "metrics line every N steps"})
    ckpt_every: int = field(default=500, metadata={"help": "checkpoint every N steps (and at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint.pt"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also write TensorBoard event files to out_dir/tensorboard (needs the 'tensorboard' extra)"})
    eval_T: int = field(default=0, metadata={"help": "also report test bpd with this many steps (0: no)"})
    eval_batches: int = field(default=0, metadata={"help": "test batches for the final bpd (0: all)"})
    sample_n: int = field(default=64, metadata={"help": "images in the final sample grid (0: none)"})
    sample_T: int = field(default=200, metadata={"help": "ancestral sampling steps"})


# Per-dataset defaults: the official models for real 8-bit data, and a small model that trains
# in minutes on 2 CPU cores for the bundled digits. Digits have 17 levels, 2/17 apart: a noise
# std of a quarter level (gamma_0 = -7) already decodes them, so the schedule starts there
# rather than at the 8-bit -13.3 (which would spend the short run learning to move it).
# The official configs (google-research/vdm configs/cifar10.py, imagenet32.py, imagenet64.py):
# 10M steps, batch 128, dropout 0.1 for all three.
_OFFICIAL = dict(gamma_min=-13.3, gamma_max=5.0, lr=2e-4, ema=0.9999, steps=10_000_000, batch_size=128, dropout=0.1)
DATASET_DEFAULTS = {
    "digits": dict(n_embd=64, n_layer=1, dropout=0.0, steps=4600, batch_size=64, lr=3e-3, ema=0.995,
                   gamma_min=-7.0, gamma_max=5.0),
    "cifar10": dict(_OFFICIAL, n_embd=128, n_layer=32),
    "imagenet32": dict(_OFFICIAL, n_embd=256, n_layer=32),
    "imagenet64": dict(_OFFICIAL, n_embd=256, n_layer=64),
    "npy": dict(_OFFICIAL, n_embd=128, n_layer=8, steps=100_000),
}

# Named recipes, between the dataset's defaults and a config file (--preset NAME): each holds
# every field that made its run, so a later change of the defaults leaves it as it was.
# digits-4000: the digits default until the recipe search of RESULTS.md ("The first run"), in
# float32 as it ran on CPUs (bf16 was then for CUDA only).
PRESETS = {
    "digits-4000": dict(data="digits", n_embd=64, n_layer=2, dropout=0.1, attention="middle", schedule="scalar",
                        gamma_min=-7.0, gamma_max=5.0, steps=4000, batch_size=64, lr=2e-3, warmup=100,
                        lr_decay="none", ema=0.995, weight_decay=0.01, bf16=False),
}

# Fields that fix the shapes of the parameters: a checkpoint is only resumable under the same.
MODEL_FIELDS = ("data", "n_embd", "n_layer", "attention", "schedule", "schedule_objective", "prediction",
                "conditional")

CHOICES = {"data": tuple(DATASET_DEFAULTS), "attention": ("middle", "all"), "schedule": tuple(SCHEDULES),
           "schedule_objective": SCHEDULE_OBJECTIVES, "ops": backend.BACKENDS, "prediction": PREDICTIONS,
           "weighting": WEIGHTINGS, "lr_decay": ("none", "cosine", "linear"), "device": ("auto", "cpu", "cuda")}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _field_kind(f) -> type:
    """A field's value type, unwrapped from Optional."""
    return next((a for a in typing.get_args(f.type) if a is not type(None)), f.type)


def _field_type(f):
    """The parser of a field's flag: its type, unwrapped from Optional."""
    kind = _field_kind(f)
    return _parse_bool if kind is bool else kind


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The trainer's command line (``prog``: the program name its usage lines show)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Train a Variational Diffusion Model and report its test bpd.")
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="a named recipe (below the config file and the flags): " + ", ".join(PRESETS))
    parser.add_argument("--config", help="YAML or JSON file of fields; flags override it")
    for f in fields(TrainConfig):
        kwargs = dict(type=_field_type(f), default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if kwargs["type"] is _parse_bool:  # "--resume" alone, or "--antithetic false"
            kwargs.update(nargs="?", const=True)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown fields {unknown}; known: {sorted(known)}")
    return values


def _typed(name: str, kind: type, value):
    """``value`` as a ``kind`` field's value, or a TypeError naming the field. The rule: bool
    fields take only true/false (not "false"), int fields only integers (not booleans, 2.5 or
    "32"), float fields numbers or a string that is wholly one number (YAML reads ``1e-3``
    as a string), str fields strings."""
    if value is None:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# Range of every numeric field: (low, high, low inclusive, high inclusive); None: unbounded.
_RANGES = {
    "n_embd": (32, None, True, None), "n_layer": (0, None, True, None), "dropout": (0.0, 1.0, True, False),
    "gamma_min": (None, None, None, None), "gamma_max": (None, None, None, None), "T": (0, None, True, None),
    "sigmoid_bias": (None, None, None, None), "label_dropout": (0.0, 1.0, True, False),
    "guidance": (0.0, None, True, None), "steps": (1, None, True, None), "batch_size": (1, None, True, None),
    "lr": (0.0, None, False, None), "warmup": (0, None, True, None), "weight_decay": (0.0, None, True, None),
    "grad_clip": (0.0, None, True, None), "ema": (0.0, 1.0, True, False), "max_bad_steps": (1, None, True, None),
    "seed": (0, 2**63 - 1, True, True), "log_every": (1, None, True, None), "ckpt_every": (1, None, True, None),
    "eval_T": (0, None, True, None), "eval_batches": (0, None, True, None), "sample_n": (0, None, True, None),
    "sample_T": (1, None, True, None), "dist_timeout": (0.0, None, False, None),
}


def _check_range(name: str, value) -> None:
    low, high, low_in, high_in = _RANGES[name]
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_in)):
        raise ValueError(f"{name} must be {'>=' if low_in else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_in)):
        raise ValueError(f"{name} must be {'<=' if high_in else '<'} {high}, got {value}")


def resolve(overrides: dict) -> TrainConfig:
    """Dataset defaults < config file < explicit flags; checks every value's type and range
    (all before any training starts)."""
    kinds = {f.name: _field_kind(f) for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - set(kinds))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; known: {sorted(kinds)}")
    values = {name: _typed(name, kinds[name], value) for name, value in overrides.items()}
    if values.get("ops") == "fused":  # configs stored before the backends were named (checkpoints): "auto"
        values["ops"] = "auto"
    data = values.get("data", "digits")
    if data not in CHOICES["data"]:
        raise ValueError(f"data must be one of {CHOICES['data']}, got {data!r}")
    for name, value in DATASET_DEFAULTS[data].items():
        if values.get(name) is None:
            values[name] = value
    cfg = TrainConfig(**values)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in _RANGES:
        _check_range(name, getattr(cfg, name))
    if cfg.n_embd % 32:
        raise ValueError(f"n_embd must be a multiple of 32 (GroupNorm's 32 groups), got {cfg.n_embd}")
    if not cfg.gamma_min < cfg.gamma_max:
        raise ValueError(f"gamma_min must be < gamma_max, got {cfg.gamma_min} and {cfg.gamma_max}")
    if cfg.schedule_objective == "variance" and (cfg.schedule != "nnet" or cfg.T):
        raise ValueError("schedule_objective variance needs --schedule nnet and the continuous-time loss (--T 0)")
    if cfg.cuda_graphs and cfg.device == "cpu":
        raise ValueError("--cuda-graphs captures CUDA work: it needs --device cuda (or auto on a machine with a GPU), "
                         "not --device cpu")
    if cfg.data != "digits" and not cfg.data_dir:
        raise ValueError(f"--data {cfg.data} needs --data-dir (nothing is downloaded)")
    return cfg


def parse_args(argv=None, prog: Optional[str] = None) -> TrainConfig:
    """The ``TrainConfig`` of a command line: preset, then config file, then flags."""
    args = vars(build_parser(prog).parse_args(argv))
    preset, config_file = args.pop("preset", None), args.pop("config", None)
    values = dict(PRESETS[preset]) if preset else {}
    values.update(load_file(config_file) if config_file else {})
    values.update(args)
    return resolve(values)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
