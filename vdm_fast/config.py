"""Configuration of a training run: one dataclass, every field a CLI flag, optionally a YAML or
JSON file underneath (flags override the file, the file overrides the dataset's defaults)."""

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional


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
    gamma_min: Optional[float] = field(default=None, metadata={"help": "initial gamma(0)"})
    gamma_max: Optional[float] = field(default=None, metadata={"help": "initial gamma(1)"})
    T: int = field(default=0, metadata={"help": "diffusion loss: 0 continuous time, else T steps"})
    antithetic: bool = field(default=True, metadata={"help": "antithetic (low-discrepancy) times"})
    ops: str = field(default="fused", metadata={"help": "fused | reference: the loss ops' backend"})
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
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases)"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    ema: Optional[float] = field(default=None, metadata={"help": "EMA decay of the weights"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many non-finite steps in a row"})
    seed: int = field(default=0, metadata={"help": "seed of data order, noise and initialisation"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast of the score network on CUDA"})
    # logging, checkpoints, evaluation
    log_every: int = field(default=10, metadata={"help": "metrics line every N steps"})
    ckpt_every: int = field(default=500, metadata={"help": "checkpoint every N steps (and at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint.pt"})
    eval_T: int = field(default=0, metadata={"help": "also report test bpd with this many steps (0: no)"})
    eval_batches: int = field(default=0, metadata={"help": "test batches for the final bpd (0: all)"})
    sample_n: int = field(default=64, metadata={"help": "images in the final sample grid (0: none)"})
    sample_T: int = field(default=200, metadata={"help": "ancestral sampling steps"})


# Per-dataset defaults: the official models for real 8-bit data, and a small model that trains
# in minutes on 2 CPU cores for the bundled digits. Digits have 17 levels, 2/17 apart: a noise
# std of a quarter level (gamma_0 = -7) already decodes them, so the schedule starts there
# rather than at the 8-bit -13.3 (which would spend the short run learning to move it).
_OFFICIAL = dict(gamma_min=-13.3, gamma_max=5.0, lr=2e-4, ema=0.9999, steps=2_000_000)
DATASET_DEFAULTS = {
    "digits": dict(n_embd=64, n_layer=2, dropout=0.1, steps=4000, batch_size=64, lr=2e-3, ema=0.995,
                   gamma_min=-7.0, gamma_max=5.0),
    "cifar10": dict(_OFFICIAL, n_embd=128, n_layer=32, dropout=0.1, batch_size=128),
    "imagenet32": dict(_OFFICIAL, n_embd=256, n_layer=32, dropout=0.0, batch_size=512),
    "imagenet64": dict(_OFFICIAL, n_embd=256, n_layer=64, dropout=0.0, batch_size=512),
    "npy": dict(_OFFICIAL, n_embd=128, n_layer=8, dropout=0.1, batch_size=128, steps=100_000),
}

# Fields that fix the shapes of the parameters: a checkpoint is only resumable under the same.
MODEL_FIELDS = ("data", "n_embd", "n_layer", "attention", "schedule", "prediction", "conditional")

CHOICES = {"data": tuple(DATASET_DEFAULTS), "attention": ("middle", "all"),
           "schedule": ("fixed", "scalar", "nnet"), "ops": ("fused", "reference"),
           "prediction": ("eps", "x", "v", "score"), "weighting": ("elbo", "sigmoid", "eps_mse"),
           "device": ("auto", "cpu", "cuda")}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _field_type(f):
    """The parser of a field's flag: its type, unwrapped from Optional."""
    kind = next((a for a in typing.get_args(f.type) if a is not type(None)), f.type)
    return _parse_bool if kind is bool else kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vdm_fast.train",
                                     description="Train a Variational Diffusion Model and report its test bpd.")
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


def resolve(overrides: dict) -> TrainConfig:
    """Dataset defaults < config file < explicit flags; checks the values."""
    cfg = TrainConfig(**overrides)
    for name, value in DATASET_DEFAULTS[cfg.data].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("steps", "batch_size", "n_embd", "log_every", "ckpt_every", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {cfg.label_dropout}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema}")
    if cfg.data != "digits" and not cfg.data_dir:
        raise ValueError(f"--data {cfg.data} needs --data-dir (nothing is downloaded)")
    return cfg


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values = load_file(config_file) if config_file else {}
    values.update(args)
    return resolve(values)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
