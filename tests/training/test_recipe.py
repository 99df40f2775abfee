"""The training recipe against the official VDM: the weight-decay mask, the fused AdamW, warm-up
and learning-rate decay, dataset defaults, the digits-4000 preset, and bf16 autocast of the network
on CPUs that multiply bf16 natively. (The recipe's model-side parts, the autocast scope, the
schedule's gradient under weighted objectives and variance minimisation: tests/nn/test_vdm.py.)"""

import math

import pytest
import torch
from helpers import assert_close, tiny_digits_vdm

from vdm_fast import config
from vdm_fast.nn import LearnedScalarSchedule, MonotoneNetSchedule
from vdm_fast.training.optim import learning_rate, make_optimizer, weight_decay_split


# --- weight decay: the official decay_mask_fn ---------------------------------------------------

_OFFICIAL_SCHEDULE_PATHS = {"w1": ("l1", "kernel"), "b1": ("l1", "bias"), "w2": ("l2", "kernel"),
                            "b2": ("l2", "bias"), "w3": ("l3", "kernel"), "w": ("w",), "b": ("b",)}


@pytest.mark.parametrize("schedule", [MonotoneNetSchedule(n_features=16), LearnedScalarSchedule()])
def test_weight_decay_follows_the_official_mask(schedule):
    model = tiny_digits_vdm(schedule)
    decayed, exempt = weight_decay_split(model)
    assert sorted(decayed + exempt) == sorted(n for n, _ in model.named_parameters())
    for name in decayed + exempt:
        parts = name.split(".")
        path = _OFFICIAL_SCHEDULE_PATHS[parts[1]] if parts[0] == "schedule" else parts
        assert (name in decayed) == (path[-1] != "bias"), name
    if isinstance(schedule, MonotoneNetSchedule):
        assert {"schedule.b1", "schedule.b2"} <= set(exempt) and "schedule.w2" in decayed
    else:  # the official scalar schedule's parameters are named w and b: both decayed
        assert {"schedule.w", "schedule.b"} <= set(decayed)
    assert "score_net.down.0.norm1.weight" in decayed and "score_net.conv_in.bias" in exempt


def test_the_optimiser_is_the_official_adamw_fused_with_the_decay_mask():
    """One fused AdamW kernel over all parameters (the per-parameter loop cost several per cent
    of a digits step), with the official betas and eps and the decay mask above; its first step
    is AdamW's: decay, then lr g / (|g| + eps)."""
    model = tiny_digits_vdm(MonotoneNetSchedule(n_features=16), dtype=torch.float32)
    cfg = config.resolve({"weight_decay": 0.01, "lr": 1e-3})
    opt = make_optimizer(model, cfg)
    names = {p: n for n, p in model.named_parameters()}
    decayed, _ = weight_decay_split(model)
    for group in opt.param_groups:
        assert group["fused"] and group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8
        assert all((names[p] in decayed) == (group["weight_decay"] == 0.01) for p in group["params"])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            expected = before[names[p]] * (1 - 1e-3 * group["weight_decay"])  # first step: m/sqrt(v) = sign(g)
            expected = expected - 1e-3 * p.grad / (p.grad.abs() + 1e-8)
            assert_close(p.detach(), expected, 1e-5, names[p])


def test_pinned_endpoints_are_exempt_from_weight_decay():
    _, exempt = weight_decay_split(tiny_digits_vdm(MonotoneNetSchedule(n_features=16, pinned=True)))
    assert {"schedule.gamma_0", "schedule.gamma_1", "schedule.b1", "schedule.b2"} <= set(exempt)


# --- dataset defaults, the warm-up and the decay, the presets ----------------------------------

def test_dataset_defaults_are_the_official_configs():
    for data in ("cifar10", "imagenet32", "imagenet64"):
        cfg = config.resolve({"data": data, "data_dir": "x"})
        assert (cfg.steps, cfg.batch_size, cfg.dropout, cfg.lr, cfg.ema) == (10_000_000, 128, 0.1, 2e-4, 0.9999)
    assert config.resolve({"data": "imagenet64", "data_dir": "x"}).n_layer == 64


def test_warm_up_starts_from_zero_as_the_official_schedule():
    cfg = config.resolve({"lr": 1e-3, "warmup": 100, "lr_decay": "none"})
    assert learning_rate(cfg, 0) == 0.0 and learning_rate(cfg, 50) == pytest.approx(5e-4)
    assert learning_rate(cfg, 100) == learning_rate(cfg, 10_000) == 1e-3
    assert learning_rate(config.resolve({"lr": 1e-3, "warmup": 0}), 0) == 1e-3


@pytest.mark.parametrize("decay, middle", [("cosine", 0.5), ("linear", 0.5)])
def test_a_decayed_learning_rate_falls_from_the_peak_after_warm_up_to_zero_at_the_last_step(decay, middle):
    cfg = config.resolve({"lr": 1e-3, "warmup": 100, "steps": 1100, "lr_decay": decay})
    assert learning_rate(cfg, 50) == pytest.approx(5e-4)  # the warm-up is the same
    assert learning_rate(cfg, 100) == pytest.approx(1e-3)
    assert learning_rate(cfg, 600) == pytest.approx(middle * 1e-3)
    assert learning_rate(cfg, 1100) == pytest.approx(0.0, abs=1e-15)
    rates = [learning_rate(cfg, s) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises after the peak
    cosine_quarter = 0.5 * (1 + math.cos(math.pi / 4))
    assert learning_rate(cfg, 350) == pytest.approx((cosine_quarter if decay == "cosine" else 0.75) * 1e-3)


def test_the_digits_4000_preset_is_the_earlier_default_below_the_config_file_and_the_flags(tmp_path):
    """--preset digits-4000 gives the digits model and recipe as they were before the recipe
    search (the numbers written out here, not read from the defaults they replaced)."""
    cfg = config.parse_args(["--preset", "digits-4000"])
    assert (cfg.data, cfg.n_embd, cfg.n_layer, cfg.dropout, cfg.attention, cfg.schedule) == \
        ("digits", 64, 2, 0.1, "middle", "scalar")
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup, cfg.lr_decay, cfg.ema, cfg.weight_decay) == \
        (4000, 64, 2e-3, 100, "none", 0.995, 0.01)
    assert (cfg.gamma_min, cfg.gamma_max, cfg.T, cfg.antithetic, cfg.bf16) == (-7.0, 5.0, 0, True, False)
    (tmp_path / "run.json").write_text('{"steps": 10, "lr": 1e-3}')
    cfg = config.parse_args(["--preset", "digits-4000", "--config", str(tmp_path / "run.json"), "--lr", "5e-4"])
    assert (cfg.steps, cfg.lr, cfg.n_embd) == (10, 5e-4, 64)  # file over preset, flag over file
    with pytest.raises(SystemExit):
        config.parse_args(["--preset", "no-such-preset"])


@pytest.mark.parametrize("native, flag, autocast", [(True, "true", torch.bfloat16), (False, "true", None),
                                                    (True, "false", None)])
def test_bf16_autocasts_the_network_on_a_cpu_only_where_it_multiplies_bf16_natively(monkeypatch, tmp_path, native,
                                                                                      flag, autocast):
    from vdm_fast import backend
    from vdm_fast.training import train
    from vdm_fast.training.distributed import Distributed

    monkeypatch.setattr(backend, "CPU_NATIVE_BF16", native)
    cfg = config.parse_args(["--out-dir", str(tmp_path), "--n-embd", "32", "--n-layer", "0", "--device", "cpu",
                             "--bf16", flag])
    run = train.Run(cfg, Distributed("cpu"))
    assert run.model.autocast_dtype == autocast
    # A bf16 model is kept channels_last (oneDNN's bf16 convolutions run in NHWC); it trains.
    conv = run.model.score_net.conv_in.weight
    assert (conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()) == (autocast is not None)
    if autocast is not None:
        for _ in range(2):
            out, objective, grad_norm = run.train_step()
            assert math.isfinite(grad_norm) and torch.isfinite(objective).all()
