"""The pure-PyTorch reference of each kernel family: readable, float64-capable, the truth every
kernel is tested against and the implementation the ``"reference"`` backend runs.

One module per family, with the same names as ``vdm_fast.ops``, ``csrc/`` and ``kernels/``:
``loss``, ``schedule``, ``norm``, ``attention``. The VDM math they share (the forward process,
parameterizations, times, weightings, pixels) is ``vdm_fast.diffusion``.
"""

from vdm_fast.reference import attention, loss, norm, schedule

__all__ = ["attention", "loss", "norm", "schedule"]
