"""The pure-PyTorch reference of VDM: readable, float64-capable, the truth for every kernel.

One module per family, with the same names as ``vdm_fast.ops``: ``loss``, ``schedule``,
``norm``, ``attention``; plus ``features`` (Fourier features, time embedding), ``times`` (how
training times are drawn and put on the T-step grid), ``weighting`` (the weightings of the
diffusion loss, by name), ``sampling`` (the ancestral sampling step) and ``process`` (the
forward process's coefficients, which the others share).
"""

from vdm_fast.reference import attention, features, loss, norm, process, sampling, schedule, times, weighting

__all__ = ["attention", "features", "loss", "norm", "process", "sampling", "schedule", "times", "weighting"]
