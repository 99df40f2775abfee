"""vdm_fast: fast Variational Diffusion Models for PyTorch.

- ``vdm_fast.reference``: the readable pure-PyTorch truth every kernel is checked against.
- ``vdm_fast.ops``: drop-in fused ops (``torch.library`` custom ops with autograd).
- ``vdm_fast.nn``: noise schedules, the VDM score U-Net and the ``VDM`` model.
- ``vdm_fast.backend``: which implementation runs each op, and a scoped switch to the reference.
"""


def _refuse_the_source_folder() -> None:
    """Stop, as numpy does, when this ``vdm_fast`` is the source folder of a checkout that was
    never built in place: ``python -m ...`` or ``python -c`` from the repository root put the
    working directory first on ``sys.path``, so ``vdm_fast/`` there (no compiled ``_C``, no
    ``vdm_fast.kernels``, which lives in ``kernels/``) would shadow the installed package and
    every op would silently run the slow reference. An editable install (``pip install -e .``)
    builds ``_C`` into this folder and passes; an installed package has no ``setup.py`` and
    ``csrc/`` beside it and passes too (a ``_C`` that fails to load there is backend.py's
    warning, not an error)."""
    import os
    from importlib.machinery import EXTENSION_SUFFIXES

    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(here)
    if not (os.path.isfile(os.path.join(checkout, "setup.py")) and os.path.isdir(os.path.join(checkout, "csrc"))):
        return
    if any(os.path.isfile(os.path.join(here, "_C" + suffix)) for suffix in EXTENSION_SUFFIXES):
        return
    raise ImportError(
        f"vdm_fast is being imported from its source folder {here}, which has no compiled extension "
        "(vdm_fast._C) and no vdm_fast.kernels: the source checkout on sys.path (the working directory, "
        "under python -m or python -c) shadows the installed package. Run from another folder, use the "
        "installed commands (vdm-fast train, vdm-fast check, pytest rather than python -m pytest), or "
        "build in place with: pip install -e ."
    )


_refuse_the_source_folder()
del _refuse_the_source_folder

from vdm_fast.backend import build_info  # noqa: E402 (after the check: it imports vdm_fast._C)

__version__ = "0.1.0"

__all__ = ["build_info", "__version__"]
