"""Test set-up shared by every module.

Triton kernels run on the CPU through its interpreter where no GPU exists: TRITON_INTERPRET
must be set before triton is first imported, hence here, at collection.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import PoisonedTorch  # noqa: E402 (imports vdm_fast, which reads TRITON_INTERPRET)


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
