"""``diffusion/parameterization.py``: eps, x, v and score predictions convert exactly into one
another. (That they give the same bound, in the reference and in the fused ops, is tested with
the loss family in tests/ops/test_loss.py.)"""

import itertools

import pytest
import torch
from helpers import assert_close, diffused_batch

from vdm_fast.reference import loss as ref
from vdm_fast.diffusion import parameterization as param

KINDS = param.PREDICTIONS


@pytest.mark.parametrize("source, target", list(itertools.permutations(KINDS, 2)))
def test_conversions_round_trip(source, target):
    _, _, gamma, z = diffused_batch()
    pred = torch.randn_like(z)
    there = param.convert(pred, z, gamma, source, target)
    assert_close(param.convert(there, z, gamma, target, source), pred, 1e-11)


def test_true_values_convert_into_each_other():
    x, eps, gamma, z = diffused_batch()
    alpha, sigma = ref.alpha_sigma(gamma[:, None, None, None])
    truth = {"eps": eps, "x": x, "v": alpha * eps - sigma * x, "score": -eps / sigma}
    for kind, value in truth.items():
        assert_close(param.from_eps(eps, z, gamma, kind), value, 1e-12, kind)
        assert_close(param.to_eps(value, z, gamma, kind), eps, 1e-12, kind)
