"""How every ``vdm_fast::`` op is registered: ``torch.library`` define/impl, a fake for
``torch.compile``, and autograd as a lean ``Autograd``-key kernel.

Why not ``@torch.library.custom_op``: in eager mode its per-call checks and Python layers
(pytorch/pytorch#176592, #139500) cost 30 microseconds a forward+backward on this project's CPU
machine, a fifth of the fused schedule's whole B=128 step; this registration does the same
dispatch (the op is one ``OpOverload``, traced opaquely by ``torch.compile`` through its fake,
differentiable through its autograd kernel, checked by ``torch.library.opcheck``) without them.
"""

import torch

_LIB = torch.library.Library("vdm_fast", "FRAGMENT")


class KernelOp:
    """``vdm_fast::<name>``: call it like the kernel function it was made from."""

    def __init__(self, name: str, kernel):
        _LIB.define(name + torch.library.infer_schema(kernel, mutates_args=()))
        # One Python kernel serves every device: it picks the CPU or CUDA kernels itself.
        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        self.name = f"vdm_fast::{name}"
        self.overload = getattr(torch.ops.vdm_fast, name).default
        # Until register_autograd gives it a formula, the op refuses to be differentiated (the
        # backward ops: no double backward) rather than torch's fallback warning and zeros.
        self._autograd = self._not_differentiable
        _LIB.impl(name, lambda *args: self._autograd(*args), "Autograd")

    def __call__(self, *args):
        return self.overload(*args)

    def _not_differentiable(self, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise RuntimeError(f"{self.name} is not differentiable: vdm_fast's ops have first derivatives only "
                               "(no double backward, create_graph=True through them)")
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    def register_fake(self, fake):
        torch.library.register_fake(self.name, fake, lib=_LIB)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        """``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` with
        ``torch.library.register_autograd``'s meaning."""
        overload = self.overload

        class Function(torch.autograd.Function):
            # ctx-style forward calling setup_context itself: a Function with a separate
            # setup_context binds its arguments through inspect.signature on every call.
            @staticmethod
            def forward(ctx, *args):
                # The differentiable call runs the device kernel below the autograd key.
                with torch._C._AutoDispatchBelowAutograd():
                    output = overload(*args)
                setup_context(ctx, args, output)
                return output

        Function.backward = staticmethod(backward)
        Function.__name__ = Function.__qualname__ = self.name.replace("::", "_")
        self._autograd = Function.apply


def kernel_op(name: str):
    """Decorator: register a kernel function (annotated like a ``custom_op``'s) as
    ``vdm_fast::<name>``."""

    def wrap(kernel) -> KernelOp:
        return KernelOp(name, kernel)

    return wrap

