"""vdm_fast: fast Variational Diffusion Models for PyTorch.

- ``vdm_fast.reference``: the readable pure-PyTorch truth every kernel is checked against.
- ``vdm_fast.ops``: drop-in fused ops (``torch.library`` custom ops with autograd).
- ``vdm_fast.nn``: noise schedules, the VDM score U-Net and the ``VDM`` model.
- ``vdm_fast.backend``: which implementation runs each op, and a scoped switch to the reference.
"""

from vdm_fast.backend import build_info

__version__ = "0.1.0"

__all__ = ["build_info", "__version__"]
