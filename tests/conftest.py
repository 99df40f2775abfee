"""Test set-up shared by every module, and the fixtures that modules in several folders use.

Triton kernels run on the CPU through its interpreter where no GPU exists: TRITON_INTERPRET
must be set before triton is first imported, hence here, at collection.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import ONE_THREAD, TINY, PoisonedTorch, run_cli  # noqa: E402 (imports vdm_fast, which reads TRITON_INTERPRET)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def use_backend():
    """``use_backend(name)``: ``vdm_fast.backend.use(name)`` for the rest of the test."""
    from vdm_fast import backend

    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(backend.use(name))


@pytest.fixture
def poisoned(monkeypatch):
    """``poisoned(module)`` makes ``module``'s allocations NaN-filled for the test."""
    def apply(module):
        monkeypatch.setattr(module, "torch", PoisonedTorch())
    return apply


# The trained runs the tests share: TINY runs on the digits without samples and with one test
# batch, trained once per pytest run in a subprocess and only read by the tests.
def _train(folder, steps: int, *extra):
    args = ["--out-dir", str(folder), "--steps", str(steps), *TINY, "--sample-n", "0", "--eval-batches", "1", *extra]
    proc = run_cli("vdm_fast.training.train", args, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    return folder / "checkpoint.pt"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """checkpoint.pt of a 4-step run on the digits (its result.json beside it)."""
    return _train(tmp_path_factory.mktemp("tiny"), 4)


@pytest.fixture(scope="session")
def conditional_ckpt(tmp_path_factory):
    """checkpoint.pt of a 40-step class-conditional run on the digits, 64 channels wide, so that
    its labels change what it computes: at 32 channels (one a GroupNorm group) the class
    embedding, added before a GroupNorm, is normalised away exactly, and after 4 steps the output
    layer is still so near its zero initialisation that the labels changed the bound by 1e-7 bpd."""
    return _train(tmp_path_factory.mktemp("conditional"), 40, "--conditional", "--n-embd", "64")


@pytest.fixture(scope="module")
def digits():
    """The digits' test images."""
    from vdm_fast.training import data

    return data.load_digits().test.images
