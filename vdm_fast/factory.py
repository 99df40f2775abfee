"""The VDM a ``TrainConfig`` describes: the one place that turns a run's configuration into a
model (used by the trainer, the checkpoint loader, the tests and the benchmarks)."""

from vdm_fast.config import TrainConfig
from vdm_fast.nn import SCHEDULES, VDM, ScoreUNet


def build_model(cfg: TrainConfig, image_shape, vocab_size: int, num_classes: int = 0) -> VDM:
    """The VDM of a config: the official score U-Net on the chosen schedule (with
    ``num_classes`` labels when ``cfg.conditional``)."""
    classes = num_classes if cfg.conditional else 0
    if cfg.conditional and classes < 1:
        raise ValueError(f"--conditional needs a labelled dataset; {cfg.data} has no labels here")
    net = ScoreUNet(in_channels=image_shape[0], n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    dropout=cfg.dropout, attention=cfg.attention, gamma_min=cfg.gamma_min,
                    gamma_max=cfg.gamma_max, num_classes=classes)
    variance = cfg.schedule_objective == "variance"
    schedule = (SCHEDULES[cfg.schedule](cfg.gamma_min, cfg.gamma_max, pinned=True) if variance
                else SCHEDULES[cfg.schedule](cfg.gamma_min, cfg.gamma_max))
    return VDM(net, schedule, image_shape, vocab_size=vocab_size, antithetic=cfg.antithetic,
               prediction=cfg.prediction, weighting=cfg.weighting, sigmoid_bias=cfg.sigmoid_bias,
               num_classes=classes, label_dropout=cfg.label_dropout, schedule_objective=cfg.schedule_objective)


__all__ = ["build_model"]
