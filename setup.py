"""Build of vdm_fast: the pure-Python package, the Triton kernels (``kernels/`` installed as
``vdm_fast.kernels``) and the pybind11 extension ``vdm_fast._C``.

``vdm_fast._C`` holds the C++ CPU kernels (``csrc/``, -O3). They take raw pointers and include no
torch headers, so the build needs only setuptools, pybind11 and a C++17 compiler (no torch, no
CUDA toolkit). The GPU kernels are the Triton ones, compiled at run time by Triton.

Both parts of the C++ build are optional, so vdm_fast installs wherever torch does:

- OpenMP: the build compiles and links a small OpenMP program with the configured compiler
  (``CC``/``CXX``) first: ``-fopenmp`` (GCC; clang where libomp is installed), and on macOS
  ``-Xpreprocessor -fopenmp -lomp`` against Homebrew's libomp. Where none works (Debian's clang
  without libomp-dev, Apple's clang without libomp) the kernels build single-threaded, with
  ``-fopenmp-simd`` so their ``#pragma omp simd`` loops still vectorise.
- The extension: where no C++ compiler works, the install still succeeds without ``_C`` and the
  CPU ops run on the PyTorch reference (Triton on CUDA). The build prints one line to stderr,
  starting ``vdm_fast: the C++ CPU kernels were not built``, and removes the ``_C`` files of the
  failed build (building in place, also a stale one from an earlier build beside the sources).
  pip shows that line only with ``pip install -v``: measured 2026-12-07 with pip 23.2.1, 24.3.1,
  25.1.1 and 26.3 (``CC=/nonexistent/cc CXX=/nonexistent/c++ pip install --no-deps --target DIR
  .``), each printed its usual progress lines and "Successfully installed vdm_fast-0.1.0" and
  nothing of the build. The signal a user always gets is the warning ``import vdm_fast`` gives
  once (``vdm_fast/backend.py``). ``VDM_FAST_REQUIRE_EXTENSION=1`` turns a failed extension build
  into a failed install (for CI and for work on ``csrc/``, where a compile error must stop).

``vdm-fast check`` prints what was built: whether OpenMP is in and how many threads the kernels use.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import BaseError, CCompilerError

ROOT = Path(__file__).parent.resolve()
REQUIRE_EXTENSION = os.environ.get("VDM_FAST_REQUIRE_EXTENSION", "") not in ("", "0")
# What a compiler that is missing, broken or refuses the code raises (distutils' errors, and the
# OSError of a compiler that cannot be run at all).
BUILD_ERRORS = (BaseError, CCompilerError, OSError)

# The probe for OpenMP: it includes omp.h, opens a parallel region and calls the runtime, so it
# compiles and links only where the compiler, the header and the runtime library all exist.
OPENMP_PROBE = """
#include <omp.h>
int vdm_fast_openmp_probe() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return n + omp_get_max_threads();
}
"""


def _libomp_prefixes() -> list:
    """Homebrew's libomp folders that hold omp.h (macOS): ``brew --prefix libomp``, then the
    Apple-silicon and Intel defaults."""
    candidates = []
    try:
        brew = subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True, timeout=60)
        if brew.returncode == 0:
            candidates.append(brew.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no Homebrew
        pass
    candidates += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    found = [p for p in candidates if p and os.path.isfile(os.path.join(p, "include", "omp.h"))]
    return list(dict.fromkeys(found))


def _openmp_candidates():
    """``(compile flags, link flags)`` that may turn OpenMP on, in the order tried."""
    yield ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "darwin":
        # Apple's clang has no -fopenmp driver flag; its front end takes OpenMP from Homebrew's
        # libomp. Not tried here (no macOS machine): torch's macOS wheels carry their own libomp,
        # and two OpenMP runtimes in one process is what libomp's "OMP: Error #15" reports.
        for prefix in _libomp_prefixes():
            yield ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"], [f"-L{prefix}/lib", "-lomp"]


def _builds(compiler, source: str, compile_flags: list, link_flags: list) -> bool:
    """Whether ``compiler`` compiles ``source`` (C++) and links it into a shared object, as the
    extension is, with these flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write(source)
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=compile_flags)
            compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"), extra_postargs=link_flags,
                                        target_lang="c++")
        except BUILD_ERRORS:
            return False
    return True


class OptionalBuildExt(build_ext):
    """pybind11's build_ext with OpenMP where the compiler has it, and the extension left out
    (one line on stderr) where it fails to build, unless VDM_FAST_REQUIRE_EXTENSION is set."""

    def build_extensions(self):
        # Here the compiler is configured (CC, CXX, LDSHARED), so the probe runs what the build runs.
        compile_flags, link_flags = next(((c, l) for c, l in _openmp_candidates()
                                          if _builds(self.compiler, OPENMP_PROBE, c, l)), (None, None))
        openmp = compile_flags is not None
        if not openmp:
            # The simd pragmas without the runtime: the loops still vectorise, and no compiler
            # warns about the other OpenMP pragmas (which it then ignores).
            compile_flags, link_flags = [f for f in ["-fopenmp-simd"] if _builds(self.compiler, "", [f], [])], []
        for ext in self.extensions:
            ext.extra_compile_args += [f for f in compile_flags if f not in ext.extra_compile_args]
            ext.extra_link_args += [f for f in link_flags if f not in ext.extra_link_args]
        super().build_extensions()
        if not openmp:
            print("vdm_fast: the compiler does not build OpenMP programs: the C++ CPU kernels were built "
                  "single-threaded", file=sys.stderr)

    def run(self):
        inplace = self.inplace  # setuptools' run clears it while building and restores it only on success
        try:
            super().run()
        except BUILD_ERRORS as err:
            self.inplace = inplace
            self._remove_outputs()
            if REQUIRE_EXTENSION:
                raise
            reason = " ".join(str(err).split())[:300]
            print(f"vdm_fast: the C++ CPU kernels were not built ({type(err).__name__}: {reason}); CPU ops run on "
                  "the PyTorch reference (set VDM_FAST_REQUIRE_EXTENSION=1 to make this an error)", file=sys.stderr)
            self.extensions = []  # nothing to copy in place or to list among the installed files

    def _remove_outputs(self):
        """No ``_C`` is left from a failed build: neither in the build folder nor, for an
        in-place or editable build, a stale one from an earlier build beside the sources (a
        regular build leaves the sources' folder alone)."""
        paths = [self._output(ext, inplace=False) for ext in self.extensions]
        if self.inplace:
            paths += [self._output(ext, inplace=True) for ext in self.extensions]
        for path in paths:
            if os.path.exists(path):
                os.remove(path)

    def _output(self, ext, inplace: bool) -> str:
        """Where ``ext`` is written: the build folder, or beside the sources (get_ext_fullpath
        answers for the one ``self.inplace`` names)."""
        current, self.inplace = self.inplace, inplace
        try:
            return self.get_ext_fullpath(ext.name)
        finally:
            self.inplace = current


ext = Pybind11Extension(
    "vdm_fast._C",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
    include_dirs=[str(ROOT / "csrc")],
    depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),  # rebuild on header edits
    # No errno and no FP-exception semantics (nothing here reads either): without them GCC
    # if-converts and vectorises the select-heavy loops of csrc/vec_math.h. OpenMP's flags are
    # added by OptionalBuildExt, where the compiler has it.
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
    cxx_std=17,
)

setup(
    packages=["vdm_fast", "vdm_fast.diffusion", "vdm_fast.reference", "vdm_fast.ops", "vdm_fast.nn", "vdm_fast.io",
              "vdm_fast.integrations", "vdm_fast.training", "vdm_fast.codec", "vdm_fast.kernels"],
    package_dir={"vdm_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": OptionalBuildExt},
)
