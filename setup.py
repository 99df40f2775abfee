"""Build of vdm_fast: the pure-Python package, the Triton kernels (``kernels/`` installed as
``vdm_fast.kernels``) and the pybind11 extension ``vdm_fast._C``.

``vdm_fast._C`` always holds the C++ CPU kernels (OpenMP, -O3). Its CUDA kernels (``csrc/*.cu``)
are compiled with nvcc for sm_80 and sm_90 and linked against the static CUDA runtime, so the
module never needs a libcudart at import time. ``VDM_FAST_CUDA`` chooses:

    VDM_FAST_CUDA=auto (default)  build the CUDA kernels when nvcc is found
    VDM_FAST_CUDA=1               build them; fail when nvcc is missing
    VDM_FAST_CUDA=0               never build them

The toolkit is looked for in ``$CUDA_HOME``, beside the ``nvcc`` on ``PATH``, then in
``/usr/local/cuda``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CUDA_ARCHS = ("80", "90")


def find_cuda_home():
    """The first CUDA toolkit with both nvcc and the static runtime, or None."""
    candidates = [os.environ.get("CUDA_HOME")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").is_file() and (home / "lib64" / "libcudart_static.a").is_file():
            return home.resolve()
    return None


def cuda_requested():
    mode = os.environ.get("VDM_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"VDM_FAST_CUDA must be 'auto', '0' or '1', got {mode!r}")
    home = find_cuda_home() if mode != "0" else None
    if mode == "1" and home is None:
        sys.exit("VDM_FAST_CUDA=1 but no CUDA toolkit (bin/nvcc and lib64/libcudart_static.a) was "
                 "found in $CUDA_HOME, beside the nvcc on PATH, or in /usr/local/cuda")
    return home


def nvcc_version(nvcc):
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


class BuildWithCuda(build_ext):
    """pybind11's build_ext, plus nvcc for the .cu sources when CUDA is requested."""

    def build_extension(self, ext):
        cuda_home = cuda_requested()
        if cuda_home is not None:
            self._compile_cuda(ext, cuda_home)
        super().build_extension(ext)

    def _compile_cuda(self, ext, cuda_home):
        nvcc = cuda_home / "bin" / "nvcc"
        objdir = Path(self.build_temp) / "cuda"
        objdir.mkdir(parents=True, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        include = [f"-I{p}" for p in ext.include_dirs]
        for src in sorted((ROOT / "csrc").glob("*.cu")):
            obj = objdir / (src.stem + ".o")
            cmd = [str(nvcc), "-c", str(src), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", *gencode, *include]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            ext.extra_objects.append(str(obj))
        ext.library_dirs.append(str(cuda_home / "lib64"))
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext.define_macros += [
            ("VDM_FAST_WITH_CUDA", "1"),
            ("VDM_FAST_CUDA_VERSION", f'"{nvcc_version(nvcc)}"'),
            ("VDM_FAST_CUDA_ARCHS", '"' + ",".join(f"sm_{a}" for a in CUDA_ARCHS) + '"'),
        ]


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
    packages=["vdm_fast", "vdm_fast.ops", "vdm_fast.reference", "vdm_fast.nn", "vdm_fast.kernels"],
    package_dir={"vdm_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithCuda},
)
