"""The pure-PyTorch reference of VDM: readable, float64-capable, the truth for every kernel.

One module per family, with the same names as ``vdm_fast.ops``: ``loss``, ``schedule``,
``norm``, ``attention``; plus ``features`` (Fourier features, time embedding).
"""

from vdm_fast.reference import attention, features, loss, norm, schedule

__all__ = ["attention", "features", "loss", "norm", "schedule"]
