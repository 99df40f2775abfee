"""The device a Triton launch runs on.

A Triton launch runs on the *current* CUDA device and its current stream, whatever device its
tensors are on (triton-lang/triton#2441): tensors on ``cuda:1`` launched while ``cuda:0`` is
current fault or run unordered with the work queued for them. Every launch in
``vdm_fast.kernels`` runs inside ``guard(tensor)``, which makes the tensor's device current
(``torch.cuda.device``, as torch's own ops do with their device guard), so the kernel runs on
that device's current stream. CPU tensors (Triton's interpreter, the tests) need no guard.
"""

import contextlib

import torch


def guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a no-op context otherwise."""
    if t.device.type == "cuda":
        # Looked up at call time, so that tests/test_gpu_ready.py can stand in for it.
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
