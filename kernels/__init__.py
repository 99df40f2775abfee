"""Triton kernels of vdm_fast, one module per op family (installed as ``vdm_fast.kernels``).

Import a family module only where a CUDA tensor needs it: importing triton is slow, and on a
machine without triton the rest of vdm_fast works without it. ``attention_tiles`` (the attention
kernels' tile table and which head dims they take) and ``_device`` (the device guard every
launch runs in) import torch only.
"""
