"""Every random draw of training and evaluation as a function of its coordinates (the seed, the
step, the example's index in the global batch or the test set, the draw, a stream), never of a
running generator's history: a resumed run continues exactly as if it had never stopped, and N
processes compute what one process with the global batch computes."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from vdm_fast.diffusion.times import antithetic_times
from vdm_fast.seeds import mix

# The streams of a training step, mix(seed, step, stream); the data order is mix(seed, epoch).
STEP_NOISE, STEP_DROPOUT = 1, 2
# The streams of one test image's draws, image_generator(seed, index, draw, stream).
IMAGE_BOUND, IMAGE_ODE, IMAGE_TIMES = 0, 1, 2


def times(batch_size: int, antithetic: bool, generator: Optional[torch.Generator] = None, device=None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """``[batch_size]`` diffusion times in ``[0, 1)``: antithetic (one uniform shift of an even
    grid) or independent uniforms."""
    if antithetic:
        return antithetic_times(batch_size, generator=generator, device=device, dtype=dtype)
    return torch.rand(batch_size, generator=generator, device=device, dtype=dtype)


class StepDraws(NamedTuple):
    """A training step's draws for the examples of one process: times ``t [B]``, the noises
    ``eps`` and ``eps_0`` (``[B, *image_shape]``) and which labels dropout replaces (bool ``[B]``)."""

    t: Tensor
    eps: Tensor
    eps_0: Tensor
    drop_labels: Tensor


def step_draws(seed: int, step: int, global_batch: int, image_shape, *, antithetic: bool, label_dropout: float,
               rows: slice = slice(None)) -> StepDraws:
    """The draws of training step ``step`` for the whole global batch (on the CPU, in float32),
    cut to ``rows``, the examples of this process."""
    gen = torch.Generator().manual_seed(mix(seed, step, STEP_NOISE))
    t = times(global_batch, antithetic, generator=gen)
    eps = torch.randn((global_batch, *image_shape), generator=gen)
    eps_0 = torch.randn((global_batch, *image_shape), generator=gen)
    drop_labels = torch.rand(global_batch, generator=gen) < label_dropout
    return StepDraws(t[rows], eps[rows], eps_0[rows], drop_labels[rows])


def dropout_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s dropout masks (``vdm_fast.nn.dropout.global_masks``)."""
    return mix(seed, step, STEP_DROPOUT)


def image_generator(seed: int, index: int, draw: int, stream: int) -> torch.Generator:
    """The CPU generator of one test image's ``draw`` (``index``: its place in the test set;
    ``stream``: ``IMAGE_BOUND``, ``IMAGE_ODE`` or ``IMAGE_TIMES``)."""
    return torch.Generator().manual_seed(mix(seed, index, draw, stream))
