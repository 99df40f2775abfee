"""Dropout whose masks can be made a function of the example's global index.

A data-parallel job splits a global batch over processes; with ``torch``'s own dropout each
process draws its masks from its own generator, so two processes do not compute what one process
with the whole batch would. Inside ``global_masks(seed, offset, global_batch)`` every
``Dropout`` draws the mask of the *whole* global batch from a generator seeded by ``(seed, its
call index)`` and keeps the rows ``offset .. offset + B`` of this process's examples: example i
gets the same mask whichever process holds it. Outside the context it is ``torch.nn.Dropout``.
"""

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor, nn

from vdm_fast.seeds import mix

_state = threading.local()
# How many global_masks contexts are open, in any thread: at 0 a Dropout skips the thread's state
# (and torch.compile traces it as torch's dropout, with no graph break).
_open = 0
_open_lock = threading.Lock()


@contextlib.contextmanager
def global_masks(seed: int, offset: int, global_batch: int):
    """Masks of the Dropouts called inside are functions of ``(seed, call index, offset + row)``."""
    global _open
    previous = getattr(_state, "masks", None)
    _state.masks = {"seed": seed, "offset": offset, "global_batch": global_batch, "calls": 0}
    with _open_lock:
        _open += 1
    try:
        yield
    finally:
        with _open_lock:
            _open -= 1
        _state.masks = previous


class Dropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or not _open:
            return super().forward(x)
        keep = _global_keep(x, self.p)
        if keep is None:
            return super().forward(x)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


@torch.compiler.disable
def _global_keep(x: Tensor, p: float) -> Optional[Tensor]:
    """The keep mask of this process's rows inside ``global_masks`` (None outside it). Run
    eagerly under ``torch.compile`` (a graph break): a generator seeded per call cannot be traced,
    and eagerly it draws the masks an uncompiled step draws."""
    masks = getattr(_state, "masks", None)
    if masks is None:
        return None
    call = masks["calls"]
    masks["calls"] += 1
    if x.shape[0] + masks["offset"] > masks["global_batch"]:
        raise ValueError(f"a batch of {x.shape[0]} at offset {masks['offset']} does not fit the global batch "
                         f"of {masks['global_batch']}")
    gen = torch.Generator(x.device).manual_seed(mix(masks["seed"], call))
    u = torch.rand((masks["global_batch"], *x.shape[1:]), generator=gen, device=x.device)
    return u[masks["offset"]:masks["offset"] + x.shape[0]] >= p
