"""The optional dependencies of the command-line entries: the core install (what ``vdm_fast.ops``
needs) leaves them out, and an entry without its extra says which ``pip install`` to run."""

import importlib.util

EXTRAS = {
    "train": ("sklearn", "tqdm", "PIL", "yaml"),  # python -m vdm_fast.training.train / evaluate / sample
    "compress": ("constriction", "tqdm"),  # python -m vdm_fast.codec.compress
    "export": ("safetensors",),  # vdm-fast export, vdm_fast.io.load_pretrained, --ckpt FOLDER
    "plot": ("matplotlib",),  # curves.png of a training run, python -m vdm_fast.training.curves (optional)
    "tensorboard": ("tensorboard",),  # python -m vdm_fast.training.train --tensorboard
    "likelihood": ("torchdiffeq",),  # python -m vdm_fast.training.evaluate --likelihood ode, vdm_fast.likelihood
    "official": ("msgpack", "safetensors"),  # vdm-fast convert: the official (JAX/Flax) checkpoints
}


class MissingExtra(ImportError):
    """A library call (not a command-line entry) needs an extra that is not installed; the
    message says which ``pip install`` to run."""


def require(extra: str, library: bool = False) -> None:
    """Exit with a one-line message when a module of ``extra`` is not installed (``library``:
    raise ``MissingExtra`` with that message instead, for a call from Python code)."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        message = (f"this part of vdm_fast needs the '{extra}' extra (missing: {', '.join(missing)}); "
                   f"install it with: pip install 'vdm_fast[{extra}]'")
        if library:
            raise MissingExtra(message)
        raise SystemExit(f"error: {message}")
