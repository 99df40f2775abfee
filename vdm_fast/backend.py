"""Which implementation runs an op: the one place that decides.

Each op family (``loss``, ``schedule``, ``norm``, ``attention``) has up to three implementations:

- ``"reference"``: ``vdm_fast.reference``, plain PyTorch, on any device and dtype;
- ``"cpp"``: the C++/OpenMP CPU kernels of the compiled module ``vdm_fast._C``;
- ``"triton"``: the Triton kernels of ``vdm_fast.kernels`` (CUDA);
- ``"torch"``: PyTorch's own CPU kernels (``attention``), called in float32 whatever the
  input's dtype, where that is faster than the reference's bf16.

``implementation(family, device, dtype)`` returns the one that runs. The process-wide choice is
``VDM_FAST_BACKEND`` (``auto``, the default: the kernels where they exist; ``reference``: the
reference everywhere), read once, at import; ``use("reference")`` switches it for a block (A/B
runs), like torch's ``torch.backends`` flags, for the whole process. Every op asks on every
call, so the answer is kept per ``(family, device, dtype)`` until ``use`` changes the choice: a
call costs one dictionary lookup.
"""

import contextlib
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference")


def _why_no_extension(err: ImportError) -> str:
    """What stopped ``vdm_fast._C`` from loading, and how to get it: the one warning at import."""
    from importlib.machinery import EXTENSION_SUFFIXES

    here = os.path.dirname(os.path.abspath(__file__))
    built = sorted(name for name in os.listdir(here) if name.startswith("_C.") and name.endswith((".so", ".pyd")))
    if not built:
        why = "it was not built (no working C++ compiler when vdm_fast was installed)"
    elif not any(name == "_C" + suffix for name in built for suffix in EXTENSION_SUFFIXES):
        why = f"{', '.join(built)} was built for another Python (this one loads _C{EXTENSION_SUFFIXES[0]})"
    else:
        why = f"it failed to load ({err}): built for another Python or CPU?"
    return (f"vdm_fast: the compiled extension vdm_fast._C is not used: {why}; the CPU ops run on the "
            "pure-PyTorch reference, which is slower. To build it, install a C++ compiler (g++ or clang++) and "
            "reinstall vdm_fast from its source (pip install --force-reinstall --no-deps SOURCE); `vdm-fast check` "
            "then reports the build.")


# The compiled module (None where it was not built or fails to load: the CPU ops then run the
# reference). A `_C` built for another Python or CPU is refused here, with the warning, too.
try:
    from vdm_fast import _C as cpu_kernels
except ImportError as _err:  # tests/test_build.py and tests/build/test_portable_build.py check this path
    cpu_kernels = None
    warnings.warn(_why_no_extension(_err), RuntimeWarning, stacklevel=2)

# Whether triton is installed, without importing it (slow, and the CPU paths never need it).
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Under TRITON_INTERPRET=1 (set before triton is imported) Triton kernels run on CPU tensors:
# the tests use it to run them on machines without a GPU.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# implementation()'s answers: (family, device, dtype) -> implementation, kept until the choice
# (use) or a table below changes.
_decided = {}


class _Table(dict):
    """A table the decisions are made from: changing an entry (a test or an experiment sending a
    family to other kernels) forgets the decisions made from it."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        _decided.clear()

    def __delitem__(self, key):
        super().__delitem__(key)
        _decided.clear()


# The kernels each family has, per device type; everything else runs the reference. The CPU
# attention block is PyTorch's own CPU kernels in float32, even for the bf16 tensors that
# training under autocast gives it: torch's bf16 CPU attention backward is slower than its
# float32 one at the U-Net's shapes (benchmarks/RESULTS.md, "Attention block").
KERNELS = _Table({
    "loss": _Table({"cpu": "cpp", "cuda": "triton"}),
    "schedule": _Table({"cpu": "cpp", "cuda": "triton"}),
    "norm": _Table({"cpu": "cpp", "cuda": "triton"}),
    "attention": _Table({"cpu": "torch", "cuda": "triton"}),
})
# dtypes an implementation of a family takes, where it does not take every floating dtype.
KERNEL_DTYPES = _Table({
    ("attention", "triton"): (torch.float32, torch.bfloat16, torch.float16),
    ("attention", "torch"): (torch.float32, torch.bfloat16, torch.float16),  # float64 stays float64
    ("norm", "cpp"): (torch.float32, torch.float64, torch.bfloat16),
})


def _from_environment() -> str:
    value = os.environ.get("VDM_FAST_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"VDM_FAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


_choice = _from_environment()


def current() -> str:
    """The backend in force: ``"auto"`` or ``"reference"``."""
    return _choice


@contextlib.contextmanager
def use(backend: str):
    """Run the block with ``backend`` (``"auto"`` or ``"reference"``) for every op, then restore
    the previous choice. Process-wide, as ``torch.backends`` flags are."""
    global _choice
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _choice = _choice, backend
    _decided.clear()
    try:
        yield
    finally:
        _choice = previous
        _decided.clear()


def _available(impl: str) -> bool:
    return impl == "torch" or (impl == "cpp" and cpu_kernels is not None) or (impl == "triton" and HAS_TRITON)


def implementation(family: str, device: torch.device, dtype: torch.dtype = None) -> str:
    """``"reference"``, ``"cpp"``, ``"triton"`` or ``"torch"``: what runs ``family``'s ops on ``device``."""
    if torch.compiler.is_compiling():
        # Traced, the decision is made afresh: torch.compile then guards on the choice itself
        # (a string), not on a dictionary that every use() clears.
        return _decide(family, device, dtype)
    key = (family, device, dtype)
    impl = _decided.get(key)
    if impl is None:
        impl = _decided[key] = _decide(family, device, dtype)
    return impl


def _decide(family: str, device: torch.device, dtype) -> str:
    if _choice == "reference":
        return "reference"
    impl = KERNELS[family].get(device.type)
    if impl is None or not _available(impl):
        return "reference"
    if dtype is not None and dtype not in KERNEL_DTYPES.get((family, impl), (dtype,)):
        return "reference"
    return impl


def kernel_devices(family: str, impl: str) -> tuple:
    """The dispatch keys ``impl``'s kernels of ``family`` register under (``"CPU"``, ``"CUDA"``):
    where it exists here, plus the CPU for Triton under ``TRITON_INTERPRET=1`` where the family
    has no compiled CPU kernel of its own."""
    if not _available(impl):
        return ()
    keys = tuple(d.upper() for d, i in KERNELS[family].items() if i == impl)
    if impl == "triton" and TRITON_INTERPRETED and KERNELS[family].get("cpu") != "cpp":
        keys += ("CPU",)
    return keys


def describe(family: str, device: torch.device, dtype: torch.dtype = None) -> str:
    """A reader's name for what runs, and why the reference where it does."""
    impl = implementation(family, device, dtype)
    if impl == "cpp":
        return "C++ (vdm_fast._C)"
    if impl == "triton":
        return "Triton"
    if impl == "torch":
        return f"PyTorch {device.type.upper()} kernels (float32)"
    if _choice == "reference":
        return "reference (backend)"
    wanted = KERNELS[family].get(device.type)
    if wanted is None:
        return f"reference (PyTorch's own {device.type} kernels)"
    if not _available(wanted):
        return "reference (no vdm_fast._C)" if wanted == "cpp" else "reference (no triton)"
    return f"reference ({dtype} not taken)"


def triton_kernels(family: str):
    """``vdm_fast.kernels.<family>``, imported on first use."""
    return importlib.import_module(f"vdm_fast.kernels.{family}")


def build_info() -> dict:
    """What ``vdm_fast._C`` was built with (``{"extension": False}`` when it is absent)."""
    if cpu_kernels is None:
        return {"extension": False}
    return {"extension": True, **cpu_kernels.build_info()}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:  # not Linux: no flags read, so no CPU is taken to have bf16 units
        return set()


# x86 instruction sets with bf16 dot products, where oneDNN's bf16 convolutions and matrix
# products beat float32 (without them torch emulates bf16, slower than float32).
_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
CPU_NATIVE_BF16 = bool(_cpu_flags() & _BF16_FLAGS)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA device, or a CPU with AVX512-BF16 or
    AMX-BF16 (read once from /proc/cpuinfo). Where the trainer's ``--bf16`` takes effect."""
    return torch.device(device).type == "cuda" or (torch.device(device).type == "cpu" and CPU_NATIVE_BF16)

