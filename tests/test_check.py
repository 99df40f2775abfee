"""``python -m vdm_fast.check``: the self-test users run on their own device."""

import os
import subprocess
import sys

import torch
from helpers import needs_cpu_kernels

from vdm_fast import backend, check


@needs_cpu_kernels
def test_the_self_test_passes_on_this_device_and_prints_one_table():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vdm_fast.check", "--device", "cpu"], capture_output=True, text=True,
                          timeout=300, cwd="/", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for op in ("reconstruction_loss", "diffuse", "diffusion_loss", "prior_loss", "gamma_nnet", "group_norm_silu",
               "attention_block"):
        assert any(line.startswith(op) and line.rstrip().endswith("ok") for line in lines), op
    assert "C++ (vdm_fast._C)" in proc.stdout and lines[-1].endswith("0 failed")
    # The threads the kernels run on: OMP_NUM_THREADS with OpenMP, 1 without.
    kernels = "OpenMP, 1 thread" if backend.build_info()["openmp"] else "without OpenMP, 1 thread"
    assert lines[1] == f"C++ CPU kernels: {kernels}", proc.stdout


def test_the_self_test_fails_on_a_wrong_op(monkeypatch):
    real = check.ops.diffuse
    monkeypatch.setattr(check.ops, "diffuse", lambda f, eps, g: real(f, eps, g) * 1.001)
    rows = check.check(torch.device("cpu"), timing=False)
    failed = {row[0] for row in rows if not row[6]}
    assert failed == {"diffuse"}
    monkeypatch.setattr(check.ops, "prior_loss", lambda f, g: (_ for _ in ()).throw(RuntimeError("kernel crashed")))
    rows = check.check(torch.device("cpu"), timing=False)
    assert any(row[0] == "prior_loss" and "kernel crashed" in row[7] for row in rows)
    assert check.main(["--device", "cpu", "--no-timing"]) == 1
