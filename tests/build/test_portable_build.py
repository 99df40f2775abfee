"""The build where the machine lacks parts of the toolchain: clang without libomp (kernels built
single-threaded), no C++ compiler at all (the install succeeds without vdm_fast._C), a ``_C``
built for another Python or CPU (refused at import), and the kernels cross-compiled for aarch64.

Each test builds a fresh copy of the sources in a temporary folder, with ``pip install --no-deps
--target`` as a user installs (pip's isolated build environment fetches setuptools and pybind11),
and imports that copy in a subprocess; one makes an editable install (``pip install -e``) in a new
virtual environment, for vdm_fast/__init__.py's check of the source folder.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "csrc", "vdm_fast", "kernels")
CROSS_CXX = "aarch64-linux-gnu-g++"
# Variables that would point the build elsewhere than the compiler a test names.
BUILD_VARIABLES = ("CC", "CXX", "LDSHARED", "VDM_FAST_REQUIRE_EXTENSION")
# Where this interpreter finds torch and the rest, for the interpreters the tests start.
SITE_PACKAGES = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]


def _copy_sources(dest: Path) -> Path:
    """The files a build reads, without any compiled ``_C`` of the working tree."""
    dest.mkdir(parents=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
        else:
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _pip_install(source: Path, target: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in BUILD_VARIABLES}
    return subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(source)],
                          capture_output=True, text=True, env={**environ, **env}, cwd=source, timeout=1200)


def _log(proc: subprocess.CompletedProcess) -> str:
    return f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def _python(script: str, target: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` in a new interpreter that imports vdm_fast from ``target`` (``sys.argv[1]``) and
    everything else from this one's site-packages. -S: no .pth file runs, so the import hook of an
    editable install of the working tree cannot hand the copy the tree's own vdm_fast._C."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *SITE_PACKAGES])}
    return subprocess.run([sys.executable, "-S", "-c", script, str(target)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _compiled(folder: Path) -> list:
    return sorted(p.name for p in (folder / "vdm_fast").glob("_C.*"))


# Forward and backward of each op backed by vdm_fast._C against vdm_fast.reference in float64, on
# fresh random inputs: the C++ kernels must be what runs (backend.implementation), within the
# tolerance of the dtype.
PARITY = r"""
import json, os, sys, torch
import vdm_fast
from vdm_fast import backend, ops, reference as ref
from vdm_fast.tolerance import RTOL

assert vdm_fast.__file__.startswith(sys.argv[1]), vdm_fast.__file__
print(json.dumps(vdm_fast.build_info()))
seed = int.from_bytes(os.urandom(4), "little")
torch.manual_seed(seed)
cpu = torch.device("cpu")

def forward_backward(fn, inputs, dtype, cotangents=None):
    leaves = [t.detach().to(dtype).requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if cotangents is None:
        cotangents = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in leaves if t.requires_grad],
                                [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    return outs + list(grads), cotangents

def cases(dtype):
    B, D = 8, 3 * 16 * 16
    x = torch.randint(0, 256, (B, D))
    f = ref.loss.encode(x, 256, dtype)
    gamma = torch.rand(B, dtype=dtype) * 5 - 8  # the ranges of vdm_fast.check, as a trained schedule gives
    yield "loss", "reconstruction_loss", [torch.randn(B, D, dtype=dtype), gamma], \
        lambda e, g: ops.reconstruction_loss(x, e, g), lambda e, g: ref.loss.reconstruction_loss(x, e, g)
    yield "loss", "diffuse", [f, torch.randn(B, D, dtype=dtype), gamma], ops.diffuse, ref.loss.diffuse
    yield "loss", "diffusion_loss", [torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype), gamma.exp()], \
        ops.diffusion_loss, ref.loss.diffusion_loss
    yield "loss", "prior_loss", [f, gamma + 10], ops.prior_loss, ref.loss.prior_loss
    n = 64
    params = [torch.randn(1, 1, dtype=dtype) + 18, torch.randn(1, dtype=dtype) - 13, torch.randn(n, 1, dtype=dtype),
              torch.randn(n, dtype=dtype), torch.randn(1, n, dtype=dtype)]
    yield "schedule", "gamma_nnet", [torch.rand(B, dtype=dtype), *params], ops.gamma_nnet, ref.schedule.nnet

def norm_cases(dtype):
    C = 64
    x = torch.randn(4, C, 8, 8).to(dtype)
    w, b, cond = 1 + 0.1 * torch.randn(C), 0.1 * torch.randn(C), torch.randn(4, C)
    yield "norm", "group_norm_silu", [x, w.to(dtype), b.to(dtype)], ops.group_norm_silu, ref.norm.group_norm_silu
    yield "norm", "group_norm_silu channels_last +cond", \
        [x.contiguous(memory_format=torch.channels_last), w.to(dtype), b.to(dtype), cond.to(dtype)], \
        lambda x, w, b, c: ops.group_norm_silu(x, w, b, cond=c), \
        lambda x, w, b, c: ref.norm.group_norm_silu(x, w, b, cond=c)

checked = 0
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    # bfloat16: the GroupNorm's kernels only (the loss and schedule kernels take float32 and float64)
    for family, name, inputs, fused, reference in [*(cases(dtype) if dtype != torch.bfloat16 else ()),
                                                   *norm_cases(dtype)]:
        assert backend.implementation(family, cpu, dtype) == "cpp", (name, dtype, backend.describe(family, cpu, dtype))
        actual, cotangents = forward_backward(fused, inputs, dtype)
        expected, _ = forward_backward(reference, inputs, torch.float64, cotangents)
        for i, (a, e) in enumerate(zip(actual, expected)):
            a, e = a.detach().double(), e.detach().double()
            assert a.shape == e.shape and torch.isfinite(a).all(), (name, dtype, i)
            err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
            assert err <= RTOL[dtype], f"{name} {dtype} output/grad {i}: {err:.3g} > {RTOL[dtype]:g} (seed {seed})"
        checked += 1
print("checked", checked)
"""


SELF_TEST = "import sys; from vdm_fast import check; sys.exit(check.main(['--device', 'cpu', '--no-timing']))"


def _clang_has_openmp(tmp_path: Path) -> bool:
    """Whether clang++ here compiles and links an OpenMP program (libomp installed)."""
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    return subprocess.run(["clang++", "-fopenmp", str(probe), "-o", str(tmp_path / "probe")],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("clang") is None or shutil.which("clang++") is None, reason="clang is not installed")
def test_clang_without_libomp_builds_kernels_that_match_the_reference(tmp_path):
    source = _copy_sources(tmp_path / "src")
    proc = _pip_install(source, tmp_path / "site", CC="clang", CXX="clang++")
    assert proc.returncode == 0, _log(proc)
    assert len(_compiled(tmp_path / "site")) == 1, _log(proc)
    run = _python(PARITY, tmp_path / "site", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    info = json.loads(run.stdout.splitlines()[0])
    assert "clang" in info["compiler"].lower(), info
    # Where libomp is installed clang builds with OpenMP; without it (Debian's clang alone) the
    # kernels are single-threaded, and build_info says so.
    openmp = _clang_has_openmp(tmp_path)
    assert info["extension"] is True and info["openmp"] is openmp, info
    if not openmp:
        assert info["openmp_max_threads"] == 1, info
    assert run.stdout.splitlines()[-1] == "checked 16", run.stdout
    selftest = _python(SELF_TEST, tmp_path / "site", cwd=tmp_path)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    kernels = "OpenMP" if openmp else "without OpenMP, 1 thread"
    assert selftest.stdout.splitlines()[1].startswith(f"C++ CPU kernels: {kernels}"), selftest.stdout


# Imports the package the way a user does, recording every warning; prints how many mention
# vdm_fast and the first one.
IMPORT_WITHOUT_EXTENSION = r"""
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, vdm_fast, vdm_fast.ops, vdm_fast.nn
    from vdm_fast import backend, ops, reference as ref
    x = torch.randint(0, 256, (4, 3, 8, 8))
    eps, gamma = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64) * 5 - 8
    loss = ops.reconstruction_loss(x, eps, gamma)
assert vdm_fast.__file__.startswith(sys.argv[1]), vdm_fast.__file__
assert vdm_fast.build_info() == {"extension": False}, vdm_fast.build_info()
assert backend.describe("loss", torch.device("cpu"), torch.float64) == "reference (no vdm_fast._C)"
assert torch.equal(loss, ref.loss.reconstruction_loss(x, eps, gamma))
mine = [str(w.message) for w in caught if "vdm_fast" in str(w.message)]
print(len(mine))
print(mine[0] if mine else "")
"""
NO_COMPILER = {"CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"}


@pytest.fixture(scope="module")
def installed_without_compiler(tmp_path_factory):
    """vdm_fast installed where the C++ compiler does not exist: ``(site folder, pip's result)``."""
    tmp = tmp_path_factory.mktemp("no_compiler")
    source = _copy_sources(tmp / "src")
    # An earlier in-place build's module in the sources: a regular build must leave it alone.
    (source / "vdm_fast" / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"built in place earlier")
    proc = _pip_install(source, tmp / "site", **NO_COMPILER)
    assert _compiled(source) == [f"_C{EXTENSION_SUFFIXES[0]}"], "the failed build removed a file of the sources"
    return tmp / "site", proc


def test_without_a_compiler_the_install_succeeds_and_import_warns_once(installed_without_compiler, tmp_path):
    site, proc = installed_without_compiler
    assert proc.returncode == 0, _log(proc)
    assert (site / "vdm_fast" / "__init__.py").is_file() and (site / "vdm_fast" / "kernels").is_dir()
    assert _compiled(site) == [], "a failed build left a compiled module behind"
    run = _python(IMPORT_WITHOUT_EXTENSION, site, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    count, message = run.stdout.splitlines()[-2:]
    assert count == "1", run.stdout
    assert "it was not built" in message and "install a C++ compiler" in message, message
    # What a user sees with the default warning filters: that one warning and no other.
    plain = _python("import vdm_fast, vdm_fast.ops", site, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    shown = re.findall(r"^\S.*:\d+: \w*Warning: .*$", plain.stderr, re.MULTILINE)
    assert len(shown) == 1 and "vdm_fast._C is not used" in shown[0], plain.stderr
    selftest = _python(SELF_TEST, site, cwd=tmp_path)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert selftest.stdout.splitlines()[1] == "C++ CPU kernels: not built (the CPU ops run the reference)"


def test_vdm_fast_require_extension_turns_a_failed_build_into_a_failed_install(tmp_path):
    source = _copy_sources(tmp_path / "src")
    proc = _pip_install(source, tmp_path / "site", VDM_FAST_REQUIRE_EXTENSION="1", **NO_COMPILER)
    assert proc.returncode != 0, _log(proc)
    assert "/nonexistent/c++" in _log(proc), _log(proc)
    assert not (tmp_path / "site" / "vdm_fast").exists()


def _venv_beside_this_one(folder: Path) -> Path:
    """A new virtual environment that sees this interpreter's site-packages (torch and the rest)
    as plain path entries, so no .pth file of theirs runs: its Python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "chain.pth").write_text("".join(f"{p}\n" for p in SITE_PACKAGES))
    return python


def test_an_editable_install_without_a_compiler_imports_from_its_checkout_and_no_other(tmp_path):
    """vdm_fast/__init__.py refuses a checkout without _C on sys.path, except the checkout an
    editable install points to: there nothing is shadowed, and the one warning says _C is missing."""
    python = _venv_beside_this_one(tmp_path / "venv")
    checkout, other = _copy_sources(tmp_path / "checkout"), _copy_sources(tmp_path / "other")
    # A module from an earlier in-place build, stale once the sources moved on: the failed
    # editable build removes it, so it cannot run against sources it was not built from.
    (checkout / "vdm_fast" / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"built in place earlier")
    environ = {k: v for k, v in os.environ.items() if k not in BUILD_VARIABLES and k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-e",
                           str(checkout)], capture_output=True, text=True, env={**environ, **NO_COMPILER},
                          timeout=1200)
    assert proc.returncode == 0, _log(proc)
    assert _compiled(checkout) == []
    # From the checkout (first on sys.path under python -c). Not from elsewhere: the editable
    # install's import hook comes after sys.path, where a regular install of vdm_fast (CI's)
    # would be found first.
    run = subprocess.run([str(python), "-c", IMPORT_WITHOUT_EXTENSION, str(checkout)], capture_output=True, text=True,
                         env=environ, cwd=checkout, timeout=600)
    assert run.returncode == 0, run.stderr
    count, message = run.stdout.splitlines()[-2:]
    assert count == "1" and "it was not built" in message, run.stdout
    run = subprocess.run([str(python), "-c", "import vdm_fast"], capture_output=True, text=True, env=environ, cwd=other,
                         timeout=600)
    assert run.returncode != 0 and "shadows the installed package" in run.stderr, run.stderr


def _aarch64_shared_object(path: Path) -> None:
    """A shared object of the C++ kernels for aarch64 at ``path``: a ``_C`` for another CPU."""
    proc = subprocess.run([CROSS_CXX, "-shared", "-fPIC", "-O1", "-std=c++17", "-I", str(ROOT / "csrc"),
                           str(ROOT / "csrc" / "schedule.cpp"), "-o", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("built_for", ["another Python", "another CPU"])
def test_a_compiled_module_built_elsewhere_is_refused_with_one_warning(built_for, installed_without_compiler,
                                                                      tmp_path):
    site, proc = installed_without_compiler
    assert proc.returncode == 0, _log(proc)
    shutil.copytree(site, tmp_path / "site")
    package = tmp_path / "site" / "vdm_fast"
    if built_for == "another Python":
        # The name another CPython gives its extension (3.9: vdm_fast requires 3.11 or later).
        other = re.sub(r"cpython-3\d+", "cpython-39", EXTENSION_SUFFIXES[0])
        assert other != EXTENSION_SUFFIXES[0], EXTENSION_SUFFIXES
        (package / f"_C{other}").write_bytes(b"\x7fELF")  # never opened: this Python looks for its own suffixes
        expected = f"_C{other} was built for another Python"
    else:
        if shutil.which(CROSS_CXX) is None:
            pytest.skip(f"{CROSS_CXX} is not installed")
        _aarch64_shared_object(package / f"_C{EXTENSION_SUFFIXES[0]}")
        expected = "it failed to load"
    run = _python(IMPORT_WITHOUT_EXTENSION, tmp_path / "site", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    count, message = run.stdout.splitlines()[-2:]
    assert count == "1" and expected in message, run.stdout


# The flags setup.py compiles csrc/ with (its own and pybind11's), then OpenMP's: -fopenmp where
# the compiler has it, -fopenmp-simd where it does not.
CXX_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-Wall", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math"]
ELF_MACHINE_AARCH64 = 183


@pytest.mark.skipif(shutil.which(CROSS_CXX) is None, reason=f"{CROSS_CXX} is not installed")
@pytest.mark.parametrize("openmp", ["-fopenmp", "-fopenmp-simd"])
def test_the_kernels_cross_compile_for_aarch64(openmp, tmp_path):
    """Every kernel file (all but the pybind11 bindings, which need the target's Python headers)
    compiles for aarch64 without a warning; with -fopenmp its loops are parallel regions (calls
    into libgomp), with -fopenmp-simd they are not."""
    cpp = sorted((ROOT / "csrc").glob("*.cpp"))
    kernels = [p for p in cpp if "pybind11" not in p.read_text()]
    assert {p.name for p in cpp} - {p.name for p in kernels} == {"module.cpp"}

    def compile_one(src: Path):
        obj = tmp_path / (src.stem + ".o")
        proc = subprocess.run([CROSS_CXX, *CXX_FLAGS, openmp, "-I", str(ROOT / "csrc"), "-c", str(src), "-o", str(obj)],
                              capture_output=True, text=True, timeout=600)
        return src.name, proc, obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, proc, obj in pool.map(compile_one, kernels):
            assert proc.returncode == 0 and "warning:" not in proc.stderr, f"{name}: {proc.stderr}"
            data = obj.read_bytes()
            assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == ELF_MACHINE_AARCH64, name
            assert (b"GOMP_parallel" in data) == (openmp == "-fopenmp"), name
