"""How every ``vdm_fast::`` op is registered: ``torch.library`` define/impl, a fake for
``torch.compile``, and autograd as a lean ``Autograd``-key kernel.

Why not ``@torch.library.custom_op``: in eager mode its per-call checks and Python layers
(pytorch/pytorch#176592, #139500) cost 30 microseconds a forward+backward on this project's CPU
machine, a fifth of the fused schedule's whole B=128 step; this registration does the same
dispatch (the op is one ``OpOverload``, traced opaquely by ``torch.compile`` through its fake,
differentiable through its autograd kernel, checked by ``torch.library.opcheck``) without them.

Plain eager calls skip even the dispatcher: calling a ``KernelOp`` on ordinary tensors, with no
trace, no dispatch mode (``make_fx``, fake tensors, ``FlopCounterMode``), no ``torch.func``
transform (``vmap``, ``grad``) and no tensor subclass about, runs the kernel function, through an
``autograd.Function`` when a gradient is wanted.
The two round trips through the dispatcher into Python that this saves (the op and its
autograd kernel, forward and backward) were ~8 % of the fused schedule's step at B=128 on the
CPU (benchmarks/RESULTS.md).
Everything else goes through the registered op, so both paths run the same kernel function.
"""

import torch

_LIB = torch.library.Library("vdm_fast", "FRAGMENT")


class KernelOp:
    """``vdm_fast::<name>``: call it like the kernel function it was made from."""

    def __init__(self, name: str, kernel):
        self.kernel = kernel
        _LIB.define(name + torch.library.infer_schema(kernel, mutates_args=()))
        # One Python kernel serves every device: it picks the CPU or CUDA kernels itself.
        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        self.name = f"vdm_fast::{name}"
        self.overload = getattr(torch.ops.vdm_fast, name).default
        # Until register_autograd gives it a formula, the op refuses to be differentiated (the
        # backward ops: no double backward) rather than torch's fallback warning and zeros.
        self._autograd = self._not_differentiable
        self._eager_autograd = None  # the autograd.Function of eager calls, once registered
        _LIB.impl(name, lambda *args: self._autograd(*args), "Autograd")

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.overload(*args)
        if _wants_grad(args):
            if self._eager_autograd is None:
                self._refuse_grad()
            return self._eager_autograd(*args)
        return self.kernel(*args)

    def _refuse_grad(self):
        raise RuntimeError(f"{self.name} is not differentiable: vdm_fast's ops have first derivatives only "
                           "(no double backward, create_graph=True through them)")

    def _not_differentiable(self, *args):
        if _wants_grad(args):
            self._refuse_grad()
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    def register_fake(self, fake):
        torch.library.register_fake(self.name, fake, lib=_LIB)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        """``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` with
        ``torch.library.register_autograd``'s meaning."""
        overload, kernel = self.overload, self.kernel

        def function(run):
            class Function(torch.autograd.Function):
                # ctx-style forward calling setup_context itself: a Function with a separate
                # setup_context binds its arguments through inspect.signature on every call.
                @staticmethod
                def forward(ctx, *args):
                    output = run(*args)
                    setup_context(ctx, args, output)
                    return output

            Function.backward = staticmethod(backward)
            Function.__name__ = Function.__qualname__ = self.name.replace("::", "_")
            return Function.apply

        def below_autograd(*args):  # the registered op's call: the device kernel below the autograd key
            with torch._C._AutoDispatchBelowAutograd():
                return overload(*args)

        self._autograd = function(below_autograd)
        self._eager_autograd = function(kernel)


def _plain_eager(args) -> bool:
    """Whether a call may skip the dispatcher: eager, no dispatch mode, no torch.func transform
    (vmap's batched tensors look like plain ones but hold no storage), only plain tensors."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._functorch.maybe_current_level() is not None):
        return False
    return all(type(a) is torch.Tensor for a in args if isinstance(a, torch.Tensor))


def _wants_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def kernel_op(name: str):
    """Decorator: register a kernel function (annotated like a ``custom_op``'s) as
    ``vdm_fast::<name>``."""

    def wrap(kernel) -> KernelOp:
        return KernelOp(name, kernel)

    return wrap

