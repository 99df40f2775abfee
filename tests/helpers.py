"""Assertions shared by the test modules (``tests/`` is on ``sys.path`` via pytest's
``pythonpath`` setting; the package itself is always the installed one)."""

import pytest
import torch

from vdm_fast import backend
from vdm_fast.tolerance import RTOL  # noqa: F401 (the tests' one tolerance table)


def assert_close(actual, expected, rtol, what="", atol=0.0):
    """``max |actual - expected| <= rtol * max |expected| + atol`` (a scale-aware comparison)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: error {err:.3g} > {rtol:.3g} * {scale:.3g} + {atol:.3g}"


def max_rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cpu_kernels = pytest.mark.skipif(backend.cpu_kernels is None, reason="vdm_fast._C not built")


class PoisonedTorch:
    """Stands in for the ``torch`` module inside a kernel module: every buffer it allocates with
    ``empty``/``empty_like`` comes filled with NaN, so an element a kernel fails to write shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))
