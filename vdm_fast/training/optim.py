"""The optimiser recipe of the official VDM: AdamW with no decay on biases, a linear warm-up and
an optional decay of the learning rate."""

import math

import torch

from vdm_fast.config import TrainConfig


def weight_decay_split(model: torch.nn.Module):
    """``(decayed, exempt)`` parameter names, as the official ``decay_mask_fn``: every parameter
    is decayed except biases, where a bias is a parameter named ``bias`` or one that a module
    lists in ``no_weight_decay`` (the monotone schedule's ``b1``, ``b2``: the official
    ``DenseMonotone`` biases; and its pinned endpoints, which the official code does not have)."""
    decayed, exempt = [], []
    for module_name, module in model.named_modules():
        biases = ("bias", *getattr(module, "no_weight_decay", ()))
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            (exempt if name in biases else decayed).append(full)
    return decayed, exempt


def _param_groups(model, weight_decay: float):
    decayed, _ = weight_decay_split(model)
    decayed = set(decayed)
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        groups[name in decayed].append(p)
    return [{"params": groups[True], "weight_decay": weight_decay}, {"params": groups[False], "weight_decay": 0.0}]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The official schedule: linear warm-up from 0 at step 0 to ``lr`` at step ``warmup``; then
    constant (the official recipe), or decayed to 0 at step ``steps`` (``lr_decay``: a short run
    ends on weights that the last steps have averaged rather than jittered)."""
    if step < cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.lr_decay == "none" or cfg.steps <= cfg.warmup:
        return cfg.lr
    progress = (step - cfg.warmup) / (cfg.steps - cfg.warmup)
    return cfg.lr * (0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1.0 - progress)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as the official recipe sets it (betas 0.9, 0.99; no decay on biases). Its fused
    implementation (one kernel over all parameters, on CPU and CUDA) where every parameter is on
    a device it supports: the per-parameter loop launches a few small kernels per tensor, a
    visible share of a small model's step."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                                  torch.float16) for p in model.parameters())
    return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                             fused=fused or None)
