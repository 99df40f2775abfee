"""Noise schedules as modules: ``schedule(t) -> (gamma(t), gamma'(t))``, ``t`` of shape ``[B]``;
and ``gamma_and_derivative``, the same pair from any other library's ``gamma(t)``.

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
    then ``variance_gradients`` gives the network's gradients of the variance instead.
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
        """The monotone network's parameters ``(w1, b1, w2, b2, w3)``, as the ops take them."""
        return self.w1, self.b1, self.w2, self.b2, self.w3

    def forward(self, t: Tensor):
        if self.pinned:
            return ops.gamma_nnet_pinned(t, *self.network(), self.gamma_0, self.gamma_1)
        return ops.gamma_nnet(t, *self.network())

    def variance_gradients(self, t: Tensor, grad_gamma: Tensor, grad_dgamma: Tensor, loss: Tensor) -> tuple:
        """The gradients ``sum_i 2 L_i dL_i/d eta`` (variance minimisation) of the network's
        parameters, in the order of ``network()``; the caller assigns them (the endpoints keep
        the gradient the trainer's VLB backward gave them). Nothing is set on the module. See
        ``vdm_fast.ops.variance_gradients`` for the arguments."""
        if not self.pinned:
            raise ValueError("variance minimisation needs pinned=True: the unpinned network has no "
                             "separate endpoints to keep on the VLB")
        return tuple(ops.variance_gradients(t, self.network(), grad_gamma, grad_dgamma, loss,
                                            endpoints=(self.gamma_0, self.gamma_1)))


def gamma_and_derivative(schedule_fn, t: Tensor):
    """``(gamma(t), gamma'(t))`` of any differentiable ``schedule_fn(t) -> gamma`` (e.g. another
    library's ``lambda t: -log_snr(t)``), by autograd in ``t``. Both stay differentiable in the
    schedule's parameters (the derivative's graph is kept), so a learned schedule trains through
    the continuous-time loss; no gradient flows to ``t`` itself. A ``schedule_fn`` that already
    returns ``(gamma, gamma')``, as vdm_fast's schedules do, is taken at its word."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"t must be a floating-point torch.Tensor, got {type(t).__name__}")
    with torch.enable_grad():
        leaf = t.detach().requires_grad_(True)
        gamma = schedule_fn(leaf)
        if isinstance(gamma, tuple) and len(gamma) == 2:
            return gamma  # its own derivative
        if not isinstance(gamma, Tensor) or gamma.shape != t.shape:
            raise ValueError(f"schedule_fn(t) must return a tensor of t's shape {tuple(t.shape)}")
        (dgamma,) = torch.autograd.grad(gamma.sum(), leaf, create_graph=True)
    return gamma, dgamma


SCHEDULES = {"fixed": FixedLinearSchedule, "scalar": LearnedScalarSchedule, "nnet": MonotoneNetSchedule}
