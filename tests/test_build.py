"""The build: the package without its extension, the extension's build report, backend choice."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import gate_tuned_triton, needs_cpu_kernels

import vdm_fast
from vdm_fast import backend, ops
from vdm_fast.diffusion import pixels
from vdm_fast.reference import loss as ref


def test_package_imports_and_works_without_the_extension():
    script = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vdm_fast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vdm_fast, vdm_fast.ops, vdm_fast.nn
            import torch
            x = torch.randint(0, 256, (2, 5)); eps = torch.randn(2, 5); g = torch.randn(2)
            loss = vdm_fast.ops.reconstruction_loss(x, eps, g)
        from vdm_fast.reference.loss import reconstruction_loss
        assert torch.equal(loss, reconstruction_loss(x, eps, g))
        assert vdm_fast.build_info() == {"extension": False}
        mine = [w for w in caught if "vdm_fast._C" in str(w.message)]
        print(len(mine))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1", "expected exactly one warning about the missing extension"


@needs_cpu_kernels
def test_extension_reports_its_build_and_holds_cpu_kernels_only():
    info = vdm_fast.build_info()
    assert info["extension"] is True and info["compiler"] and isinstance(info["openmp"], bool)
    # GCC on Linux always has OpenMP (libgomp): a build without it here is setup.py's probe gone wrong.
    if sys.platform == "linux" and "clang" not in info["compiler"].lower():
        assert info["openmp"] is True, info
    # The threads the kernels use: torch's pool (one OpenMP runtime in the process), or 1.
    assert info["openmp_max_threads"] == (torch.get_num_threads() if info["openmp"] else 1), info
    assert not [name for name in dir(backend.cpu_kernels) if "cuda" in name.lower()]


def test_the_backend_switch_is_scoped_and_refuses_unknown_names():
    def refuse(*args):
        raise AssertionError("the fused op ran under the reference backend")

    x, eps, g = torch.randint(0, 256, (2, 5)), torch.randn(2, 5), torch.randn(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vdm_fast.ops.loss._reconstruction_loss", refuse)
        with backend.use("reference"):
            assert backend.current() == "reference"
            assert torch.equal(ops.reconstruction_loss(x, eps, g), ref.reconstruction_loss(x, eps, g))
        assert backend.current() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend.use("fastest"):
            pass


def test_vdm_fast_backend_is_read_once_at_import_and_checked():
    script = ("import os, vdm_fast.backend as b; first = b.current(); os.environ['VDM_FAST_BACKEND'] = 'auto'; "
              "print(first, b.current())")
    env = {**os.environ, "VDM_FAST_BACKEND": "reference"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert proc.returncode == 0 and proc.stdout.split() == ["reference", "reference"], proc.stderr
    env["VDM_FAST_BACKEND"] = "fastest"
    proc = subprocess.run([sys.executable, "-c", "import vdm_fast.ops"], capture_output=True, text=True, env=env,
                          cwd="/")
    assert proc.returncode != 0 and "VDM_FAST_BACKEND must be one of ('auto', 'reference'), got 'fastest'" in proc.stderr


def test_no_module_of_the_package_writes_the_environment():
    root = os.path.dirname(vdm_fast.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert "os.environ[" not in text and "os.putenv" not in text and "setenv" not in text, name


# Every public loss op, called the way a trainer calls it, and the reference function that must
# produce its result under the reference backend.
_B, _SHAPE = 3, (2, 4, 4)


def _loss_calls():
    x = torch.randint(0, 256, (_B, *_SHAPE))
    f = pixels.encode(x, 256)
    eps, pred, eps_0 = (torch.randn(_B, *_SHAPE) for _ in range(3))
    g = torch.tensor([-3.0, 0.0, 2.0])
    return {
        "diffuse": (lambda: ops.diffuse(f, eps, g), ["diffuse"]),
        "diffusion_loss": (lambda: ops.diffusion_loss(eps, pred, g.exp()), ["diffusion_loss"]),
        "diffusion_loss v": (lambda: ops.diffusion_loss(eps, pred, g.exp(), prediction="v", x=f, gamma_t=g),
                             ["diffusion_loss"]),
        "diffusion_loss_discrete": (lambda: ops.diffusion_loss_discrete(eps, pred, g, g - 1, 10),
                                    ["diffusion_loss_discrete"]),
        "prior_loss": (lambda: ops.prior_loss(f, g + 3), ["prior_loss"]),
        "reconstruction_loss": (lambda: ops.reconstruction_loss(x, eps_0, g - 5), ["reconstruction_loss"]),
        "vlb_terms": (lambda: ops.vlb_terms(x, eps, pred, eps_0, g, g - 5, g + 3, dgamma_dt=g.exp()).bpd,
                      ["diffusion_loss", "reconstruction_loss", "prior_loss"]),
    }


@pytest.mark.parametrize("op", list(_loss_calls()))
def test_under_the_reference_backend_every_loss_op_returns_the_reference_functions_result(op, monkeypatch):
    """Each reference function named is replaced by one that records its call and returns its
    result plus a marker: the op's output must carry the marker, so it came from there."""
    call, names = _loss_calls()[op]
    called = []
    for name in names:
        original = getattr(ref, name)

        def marked(*args, _original=original, _name=name, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs) + 1000.0

        monkeypatch.setattr(ref, name, marked)
    with backend.use("reference"):
        marked_out = call()
    monkeypatch.undo()
    with backend.use("reference"):
        plain_out = call()
    assert sorted(called) == sorted(names)
    assert not torch.allclose(marked_out, plain_out)  # the reference's output is what came back


@gate_tuned_triton
def test_every_triton_kernel_compiles_for_the_card():
    """Code generation for sm_90 (H100/H200) of every kernel variant the ops launch, on this
    GPU-less machine: ptxas, tensor-core dots, reductions and the shared-memory limit are checked
    here, before a card ever runs them (tests/compile_triton.py; numbers are the CUDA tests')."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_triton.py")
    out = subprocess.run([sys.executable, "-P", script, "--arch", "90"], capture_output=True, text=True, env=env,
                         cwd="/", timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1].endswith("for sm_90, 0 failed"), out.stdout[-2000:]


def test_the_core_install_imports_none_of_the_extras():
    # Compared with what importing torch alone brings in (torch itself imports tqdm if present).
    script = ("import sys, torch; before = set(sys.modules); "
              "import vdm_fast, vdm_fast.ops, vdm_fast.nn, vdm_fast.check; "
              "print([m for m in ('sklearn', 'tqdm', 'PIL', 'yaml', 'constriction', 'diffusers') "
              "if m in sys.modules and m not in before])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_missing_extra_names_the_pip_install_to_run(monkeypatch):
    from vdm_fast import extras

    monkeypatch.setitem(extras.EXTRAS, "train", ("tqdm", "no_such_module_for_the_test"))
    with pytest.raises(SystemExit, match=r"missing: no_such_module_for_the_test.*pip install 'vdm_fast\[train\]'"):
        extras.require("train")


@pytest.mark.skipif(not backend.build_info().get("openmp"), reason="needs vdm_fast._C built with OpenMP")
def test_the_cpu_kernels_share_torchs_openmp_runtime_and_thread_count():
    """torch's CPU build and vdm_fast._C both need libgomp.so.1: the process loads it once, so
    the kernels run on torch's thread pool with torch.get_num_threads() threads."""
    script = textwrap.dedent("""
        import torch, vdm_fast
        gomp = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
        torch.set_num_threads(1)
        print(len(gomp), vdm_fast.build_info()["openmp_max_threads"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1"], proc.stdout
