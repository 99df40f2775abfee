"""Test set-up shared by every module.

Triton kernels run on the CPU through its interpreter where no GPU exists: TRITON_INTERPRET
must be set before triton is first imported, hence here, at collection.
"""

import os

import pytest
import torch
from helpers import PoisonedTorch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned(monkeypatch):
    """``poisoned(module)`` makes ``module``'s allocations NaN-filled for the test."""
    def apply(module):
        monkeypatch.setattr(module, "torch", PoisonedTorch())
    return apply
