"""How every ``vdm_fast::`` op is registered, through ``torch.library``'s public API only.

An op is defined once, with the schema inferred from its kernels' annotations, and gets one
kernel per dispatch key, as ``torch.library`` intends and flash-attention's ops do: the C++ CPU
kernels under ``CPU``, the Triton kernels under ``CUDA`` (``vdm_fast.backend.kernel_devices``
says where each exists), so no kernel tests the device itself. A fake makes it traceable by
``torch.compile`` as one node; an autograd formula, whose backward is itself a ``vdm_fast::``
op, makes it differentiable once (no double backward).
"""

import torch

from vdm_fast import backend

_LIB = torch.library.Library("vdm_fast", "FRAGMENT")


class KernelOp:
    """``vdm_fast::<name>``, called like its kernels."""

    def __init__(self, name: str, family: str, cpu=None, triton=None):
        if cpu is None and triton is None:
            raise ValueError(f"vdm_fast::{name} needs a kernel")
        _LIB.define(name + torch.library.infer_schema(cpu or triton, mutates_args=()))
        for impl, kernel in (("cpp", cpu), ("triton", triton)):
            if kernel is not None:
                for key in backend.kernel_devices(family, impl):
                    _LIB.impl(name, kernel, key)
        self.name = f"vdm_fast::{name}"
        self.overload = getattr(torch.ops.vdm_fast, name).default

    def __call__(self, *args):
        return self.overload(*args)

    def register_fake(self, fake):
        torch.library.register_fake(self.name, fake, lib=_LIB)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        """``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` with
        ``torch.library.register_autograd``'s meaning. The backward refuses to be differentiated
        (``create_graph=True``) by name, rather than torch's fallback warning and zero second
        derivatives."""
        name = self.name

        def first_order_only(ctx, *grads):
            if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                               for t in (*ctx.saved_tensors, *grads)):
                raise RuntimeError(f"{name}_backward is not differentiable: vdm_fast's ops have first derivatives "
                                   "only (no double backward, create_graph=True through them)")
            return backward(ctx, *grads)

        torch.library.register_autograd(self.name, first_order_only, setup_context=setup_context, lib=_LIB)


def kernel_op(name: str, family: str, *, cpu=None, triton=None) -> KernelOp:
    """Register ``cpu`` (the C++ kernels' caller) and ``triton`` (the Triton kernels' caller),
    annotated like a ``custom_op``'s function, as ``vdm_fast::<name>`` of op family ``family``."""
    return KernelOp(name, family, cpu, triton)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how the compiled kernels are told a dtype."""
    return str(dtype).removeprefix("torch.")
