"""Modules built on ``vdm_fast.ops``: noise schedules, the score U-Net and the VDM model."""

from vdm_fast.nn.blocks import AttnBlock, GroupNormSiLU
from vdm_fast.nn.schedule import (SCHEDULES, FixedLinearSchedule, LearnedScalarSchedule, MonotoneNetSchedule,
                                  gamma_and_derivative)
from vdm_fast.nn.unet import ResnetBlock, ScoreUNet
from vdm_fast.nn.vdm import VDM, VDMOutput
from vdm_fast.ops.loss import VLBTerms

__all__ = ["AttnBlock", "GroupNormSiLU", "SCHEDULES", "FixedLinearSchedule", "LearnedScalarSchedule",
           "MonotoneNetSchedule", "ResnetBlock", "ScoreUNet", "VDM", "VDMOutput", "VLBTerms",
           "gamma_and_derivative"]
