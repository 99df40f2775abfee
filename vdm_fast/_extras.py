"""The optional dependencies of the command-line entries: the core install (what ``vdm_fast.ops``
needs) leaves them out, and an entry without its extra says which ``pip install`` to run."""

import importlib.util

EXTRAS = {
    "train": ("sklearn", "tqdm", "PIL", "yaml"),  # python -m vdm_fast.train / evaluate / sample
    "compress": ("constriction", "tqdm"),  # python -m vdm_fast.compress
}


def require(extra: str) -> None:
    """Exit with a one-line message when a module of ``extra`` is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: this part of vdm_fast needs the '{extra}' extra (missing: {', '.join(missing)}); "
                         f"install it with: pip install 'vdm_fast[{extra}]'")
