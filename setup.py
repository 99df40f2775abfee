"""Build of vdm_fast: the pure-Python package, the Triton kernels (``kernels/`` installed as
``vdm_fast.kernels``) and the pybind11 extension ``vdm_fast._C``.

``vdm_fast._C`` holds the C++ CPU kernels (``csrc/``, OpenMP, -O3). They take raw pointers and
include no torch headers, so the build needs only setuptools, pybind11 and a C++17 compiler (no
torch, no CUDA toolkit). The GPU kernels are the Triton ones, compiled at run time by Triton.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()


ext = Pybind11Extension(
    "vdm_fast._C",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
    include_dirs=[str(ROOT / "csrc")],
    depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),  # rebuild on header edits
    # No errno and no FP-exception semantics (nothing here reads either): without them GCC
    # if-converts and vectorises the select-heavy loops of csrc/vec_math.h.
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

setup(
    packages=["vdm_fast", "vdm_fast.diffusion", "vdm_fast.reference", "vdm_fast.ops", "vdm_fast.nn", "vdm_fast.io",
              "vdm_fast.integrations", "vdm_fast.training", "vdm_fast.codec", "vdm_fast.kernels"],
    package_dir={"vdm_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
