"""vdm_fast: fast Variational Diffusion Models for PyTorch.

- ``vdm_fast.ops``: drop-in fused ops (``torch.library`` custom ops with autograd).
- ``vdm_fast.nn``: noise schedules, the VDM score U-Net and the ``VDM`` model.
- ``vdm_fast.diffusion``: the VDM math the rest shares; ``vdm_fast.reference``: the readable
  pure-PyTorch truth every kernel is checked against.
- ``vdm_fast.io``: checkpoints and exported folders, ``load_model(path)``.
- ``vdm_fast.samplers``, ``vdm_fast.likelihood``: fast samplers, the probability-flow ODE.
- ``vdm_fast.backend``: which implementation runs each op, and a scoped switch to the reference.
- ``vdm_fast.training``, ``vdm_fast.codec``, ``vdm_fast.integrations``: the driver and its CLIs,
  bits-back compression, adapters to other libraries and the official checkpoints' converter.
"""


def _refuse_the_source_folder() -> None:
    """Stop, as numpy does, when this ``vdm_fast`` is the source folder of a checkout that shadows
    the installed package: ``python -m ...`` or ``python -c`` from the repository root put the
    working directory first on ``sys.path``, so ``vdm_fast/`` there (no compiled ``_C``, no
    ``vdm_fast.kernels``, which lives in ``kernels/``) would stand in for the installed build and
    every op would silently run the slow reference.

    Which imports pass:

    - an installed package: it has no ``setup.py`` and ``csrc/`` beside it, with or without
      ``_C`` (without it, backend.py warns once and the CPU ops run the reference);
    - a checkout with ``_C`` built in place (``pip install -e .``);
    - a checkout without ``_C`` that an editable install of vdm_fast points to, as pip records it
      in the distribution's ``direct_url.json`` (PEP 610): ``pip install -e .`` where no C++
      compiler worked. Nothing is shadowed there; backend.py warns once.

    Any other checkout without ``_C`` is refused."""
    import os
    from importlib.machinery import EXTENSION_SUFFIXES

    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(here)
    if not (os.path.isfile(os.path.join(checkout, "setup.py")) and os.path.isdir(os.path.join(checkout, "csrc"))):
        return
    if any(os.path.isfile(os.path.join(here, "_C" + suffix)) for suffix in EXTENSION_SUFFIXES):
        return
    if _editable_install_of(checkout):
        return
    raise ImportError(
        f"vdm_fast is being imported from its source folder {here}, which has no compiled extension "
        "(vdm_fast._C) and no vdm_fast.kernels: the source checkout on sys.path (the working directory, "
        "under python -m or python -c) shadows the installed package. Run from another folder, use the "
        "installed commands (vdm-fast train, vdm-fast check, pytest rather than python -m pytest), or "
        "build in place with: pip install -e ."
    )


def _editable_install_of(checkout: str) -> bool:
    """Whether an installed vdm_fast distribution is an editable install of ``checkout``."""
    import json
    import os
    from importlib import metadata
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    for dist in metadata.distributions(name="vdm_fast"):
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:  # a damaged record is no evidence either way
            continue
        url = urlparse(direct.get("url", ""))
        if (direct.get("dir_info", {}).get("editable") and url.scheme == "file"
                and os.path.realpath(url2pathname(url.path)) == os.path.realpath(checkout)):
            return True
    return False


_refuse_the_source_folder()
del _refuse_the_source_folder, _editable_install_of

from vdm_fast.backend import build_info  # noqa: E402 (after the check: it imports vdm_fast._C)

__version__ = "0.1.0"

__all__ = ["build_info", "__version__"]
