"""The build: the package without its extension, the extension's build report, backend choice."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vdm_fast
from vdm_fast import _ext, ops
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
        assert vdm_fast.build_info() == {"extension": False, "cuda": False}
        mine = [w for w in caught if "vdm_fast._C" in str(w.message)]
        print(len(mine))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1", "expected exactly one warning about the missing extension"


@pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="vdm_fast._C not built")
def test_extension_reports_its_build():
    info = vdm_fast.build_info()
    assert info["extension"] is True and info["openmp"] is True
    assert isinstance(info["cuda"], bool) and info["compiler"]
    if info["cuda"]:
        assert info["cuda_archs"] == "sm_80,sm_90" and "cuda" in info["cuda_version"]
        assert hasattr(_ext._C, "recon_forward_cuda")


def test_backend_reference_forces_the_reference(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fused op ran although VDM_FAST_BACKEND=reference")

    monkeypatch.setattr("vdm_fast.ops.loss._reconstruction_loss", refuse)
    monkeypatch.setenv("VDM_FAST_BACKEND", "reference")
    x, eps, g = torch.randint(0, 256, (2, 5)), torch.randn(2, 5), torch.randn(2)
    assert torch.equal(ops.reconstruction_loss(x, eps, g), ref.reconstruction_loss(x, eps, g))
    monkeypatch.setenv("VDM_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VDM_FAST_BACKEND"):
        ops.reconstruction_loss(x, eps, g)


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
    from vdm_fast import _extras

    monkeypatch.setitem(_extras.EXTRAS, "train", ("tqdm", "no_such_module_for_the_test"))
    with pytest.raises(SystemExit, match=r"missing: no_such_module_for_the_test.*pip install 'vdm_fast\[train\]'"):
        _extras.require("train")


@pytest.mark.skipif(not _ext.has_cpu_kernels() or not _ext.build_info().get("openmp"),
                    reason="needs vdm_fast._C built with OpenMP")
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
