"""Noise schedules as modules: ``schedule(t) -> (gamma(t), gamma'(t))``, ``t`` of shape ``[B]``.

Each keeps the configured ``gamma_min`` / ``gamma_max`` (its initial endpoints), which the score
network uses to normalise its time input, as the official code does.
"""

import torch
from torch import Tensor, nn

from vdm_fast import ops
from vdm_fast.reference import schedule as ref


class FixedLinearSchedule(nn.Module):
    """``gamma(t) = gamma_min + (gamma_max - gamma_min) t``, no parameters."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min must be < gamma_max, got {gamma_min} and {gamma_max}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def forward(self, t: Tensor):
        return ref.fixed_linear(t, self.gamma_min, self.gamma_max)


class LearnedScalarSchedule(FixedLinearSchedule):
    """``gamma(t) = b + |w| t``, initialised to the fixed linear schedule (official init)."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        super().__init__(gamma_min, gamma_max)
        self.w = nn.Parameter(torch.tensor([self.gamma_max - self.gamma_min]))
        self.b = nn.Parameter(torch.tensor([self.gamma_min]))

    def forward(self, t: Tensor):
        return ref.learned_scalar(t, self.w, self.b)


class MonotoneNetSchedule(FixedLinearSchedule):
    """The official learned monotone network ``NoiseSchedule_NNet`` (math in
    ``vdm_fast.reference.schedule.nnet_gamma``), ``n_features`` hidden units, evaluated by the
    fused op ``vdm_fast.ops.gamma_nnet`` (gamma and gamma' in one pass, analytic backward).

    Initialised as the official code: ``w1 = gamma_max - gamma_min``, ``b1 = gamma_min``,
    ``w2, w3 ~ N(0, 0.01^2)`` (flax's default ``normal()``), ``b2 = 0``.

    ``pinned=True``: the paper's form, ``gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0))``
    with learned endpoints ``gamma_0``, ``gamma_1`` (initialised to ``gamma_min``, ``gamma_max``);
    then ``variance_gradients_`` turns the network's gradients into those of the variance.
    """

    # The official mask exempts biases from weight decay; b1, b2 are the DenseMonotone biases,
    # and the pinned endpoints are kept off it too (decay would pull gamma_0 toward 0).
    no_weight_decay = ("b1", "b2", "gamma_0", "gamma_1")

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, n_features: int = 1024,
                 pinned: bool = False):
        super().__init__(gamma_min, gamma_max)
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.w1 = nn.Parameter(torch.tensor([[self.gamma_max - self.gamma_min]]))
        self.b1 = nn.Parameter(torch.tensor([self.gamma_min]))
        self.w2 = nn.Parameter(torch.randn(n_features, 1) * 0.01)
        self.b2 = nn.Parameter(torch.zeros(n_features))
        self.w3 = nn.Parameter(torch.randn(1, n_features) * 0.01)
        self.pinned = pinned
        if pinned:
            self.gamma_0 = nn.Parameter(torch.tensor([self.gamma_min]))
            self.gamma_1 = nn.Parameter(torch.tensor([self.gamma_max]))

    def network(self):
        return self.w1, self.b1, self.w2, self.b2, self.w3

    def forward(self, t: Tensor):
        if self.pinned:
            return ops.gamma_nnet_pinned(t, *self.network(), self.gamma_0, self.gamma_1)
        return ops.gamma_nnet(t, *self.network())

    def variance_gradients_(self, t: Tensor, grad_gamma: Tensor, grad_dgamma: Tensor, loss: Tensor) -> None:
        """Set the network parameters' ``.grad`` to ``sum_i 2 L_i dL_i/d eta`` (variance
        minimisation); the endpoints keep the gradient the trainer's VLB backward gave them.
        See ``vdm_fast.ops.variance_gradients`` for the arguments."""
        if not self.pinned:
            raise ValueError("variance minimisation needs pinned=True: the unpinned network has no "
                             "separate endpoints to keep on the VLB")
        grads = ops.variance_gradients(t, self.network(), grad_gamma, grad_dgamma, loss,
                                       endpoints=(self.gamma_0, self.gamma_1))
        for p, g in zip(self.network(), grads):
            p.grad = g


SCHEDULES = {"fixed": FixedLinearSchedule, "scalar": LearnedScalarSchedule, "nnet": MonotoneNetSchedule}
