"""Loads the compiled extension ``vdm_fast._C`` and says which backend the ops use.

Without the extension (a source checkout, a failed build) everything still works on the
pure-PyTorch reference, and one warning says so.
"""

import functools
import importlib
import os
import warnings

try:
    from vdm_fast import _C
except ImportError as _err:  # pragma: no cover - exercised by a subprocess test
    _C = None
    warnings.warn(
        f"vdm_fast: the compiled extension vdm_fast._C could not be loaded ({_err}); "
        "the CPU ops fall back to the pure-PyTorch reference, which is slower.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """What ``vdm_fast._C`` was built with (``{"extension": False}`` when it is absent)."""
    if _C is None:
        return {"extension": False, "cuda": False}
    return {"extension": True, **_C.build_info()}


def use_reference() -> bool:
    """True when ``VDM_FAST_BACKEND=reference`` asks every op to run its reference (A/B runs)."""
    backend = os.environ.get("VDM_FAST_BACKEND", "auto")
    if backend not in ("auto", "reference"):
        raise ValueError(f"VDM_FAST_BACKEND must be 'auto' or 'reference', got {backend!r}")
    return backend == "reference"


def cuda_impl() -> str:
    """Which CUDA kernels an op with both kinds runs: ``VDM_FAST_CUDA_IMPL=triton`` (default) or
    ``cuda`` (the CUDA C++ kernels of ``vdm_fast._C``, where built)."""
    impl = os.environ.get("VDM_FAST_CUDA_IMPL", "triton")
    if impl not in ("triton", "cuda"):
        raise ValueError(f"VDM_FAST_CUDA_IMPL must be 'triton' or 'cuda', got {impl!r}")
    return impl


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_kernels(family: str):
    """``vdm_fast.kernels.<family>``, imported on first use: importing triton is slow, and the
    CPU paths never need it."""
    return importlib.import_module(f"vdm_fast.kernels.{family}")


def cuda_stream(t) -> int:
    """The handle of the current CUDA stream on ``t``'s device: the compiled kernels launch on it."""
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and hasattr(_C, "recon_forward_cuda")


def fused_available(device, cuda_cpp: bool = False) -> bool:
    """Whether an op's kernels serve ``device``; ``cuda_cpp``: the op also has CUDA C++ kernels
    (else it runs Triton only on CUDA). Where not, the op runs its reference."""
    if use_reference():
        return False
    if device.type == "cpu":
        return has_cpu_kernels()
    if device.type == "cuda":
        return has_triton() or (cuda_cpp and has_cuda_kernels())
    return False


def prefer_cuda_cpp() -> bool:
    """For an op with both kinds of CUDA kernels: run the CUDA C++ ones (asked for, or no triton)."""
    return (cuda_impl() == "cuda" and has_cuda_kernels()) or not has_triton()


def dtype_name(dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how the compiled kernels are told a dtype."""
    return str(dtype).removeprefix("torch.")
