"""How every ``vdm_fast::`` op is registered, and how a call reaches its kernel.

Registration, through ``torch.library``'s public API only: an op is defined once, with the schema
inferred from its kernels' annotations, and gets one kernel per dispatch key, as
``torch.library`` intends and flash-attention's ops do: the C++ CPU kernels under ``CPU``, the
Triton kernels under ``CUDA`` (``vdm_fast.backend.kernel_devices`` says where each exists), so no
kernel tests the device itself. A fake makes it traceable by ``torch.compile`` as one node; an
autograd formula, whose backward is itself a ``vdm_fast::`` op, makes it differentiable once (no
double backward). ``torch.library.opcheck`` checks exactly this registered op.

The call (``KernelOp.__call__``): a plain eager call runs the device's kernel function directly,
through a ``torch.autograd.Function`` made of the same autograd formula when a gradient is
wanted; every other call goes through the registered op. The dispatcher's two round trips into
Python (the autograd kernel, then the device kernel) and the ``torch.library`` autograd wrapper
cost more than the C++ kernel of a small tensor and than the plain PyTorch the op replaces
(docs/design/backend.md, "Host cost per call"; benchmarks/bench_overhead.py measures it). "Plain" means: not traced by ``torch.compile``,
no dispatch mode (``make_fx``, fake tensors, ``FlopCounterMode``, ``opcheck``'s checks), no torch
function mode (``torch.device`` as a context, ``set_default_device``), no ``torch.func``
transform, and every argument an ordinary tensor or parameter or a Python scalar. Both paths run
the same kernel functions and the same formulas, so they compute the same bits.
"""

import torch

from vdm_fast import backend

_LIB = torch.library.Library("vdm_fast", "FRAGMENT")

# Argument types of a plain eager call: ordinary tensors (a module's weights are Parameters) and
# the ops' scalars. A tensor subclass (FakeTensor, DTensor, FunctionalTensor, ...) is not here.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter, int, float, bool, type(None)))


# The checks of every eager call, bound once (a module attribute lookup per call adds up here).
_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_functorch_level = torch._C._functorch.maybe_current_level
_grad_enabled = torch.is_grad_enabled


def _traced() -> bool:
    """Whether something observes or transforms the call, so that it must be the registered op.
    ``torch.compiler.is_compiling()`` comes first: under dynamo it is a constant and the rest,
    which dynamo could not trace, is never reached."""
    return bool(_compiling() or _dispatch_modes() or _function_modes() or _functorch_level() is not None)


class KernelOp:
    """``vdm_fast::<name>``, called like its kernels."""

    def __init__(self, name: str, family: str, cpu=None, triton=None):
        if cpu is None and triton is None:
            raise ValueError(f"vdm_fast::{name} needs a kernel")
        _LIB.define(name + torch.library.infer_schema(cpu or triton, mutates_args=()))
        self.kernels = {}  # device type -> the kernel function registered under its key
        for impl, kernel in (("cpp", cpu), ("triton", triton)):
            if kernel is not None:
                for key in backend.kernel_devices(family, impl):
                    _LIB.impl(name, kernel, key)
                    self.kernels[key.lower()] = kernel
        self.name = f"vdm_fast::{name}"
        self.overload = getattr(torch.ops.vdm_fast, name).default
        self.functions = {}  # device type -> apply of the autograd.Function of eager calls (register_autograd)

    def __call__(self, *args):
        if _traced() or not _PLAIN.issuperset(map(type, args)):
            return self.overload(*args)
        first = args[0]
        device = "cpu" if first.is_cpu else "cuda" if first.is_cuda else None
        kernel = self.kernels.get(device)
        if kernel is None:  # no kernel here: the dispatcher's own error
            return self.overload(*args)
        if _grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    function = self.functions.get(device)
                    # An op without a formula (a backward) takes torch's path: its fallback warns.
                    return self.overload(*args) if function is None else function(*args)
        return kernel(*args)

    def register_fake(self, fake):
        torch.library.register_fake(self.name, fake, lib=_LIB)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        """``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` with
        ``torch.library.register_autograd``'s meaning, for the registered op and for eager calls;
        ``backward`` takes None for the gradient of an output that reached no loss.
        The backward refuses to be differentiated (``create_graph=True``) by name, rather than
        torch's fallback warning and zero second derivatives."""
        name = self.name

        def first_order_only(ctx, *grads):
            if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                               for t in (*ctx.saved_tensors, *grads)):
                raise RuntimeError(f"{name}_backward is not differentiable: vdm_fast's ops have first derivatives "
                                   "only (no double backward, create_graph=True through them)")
            return backward(ctx, *grads)

        torch.library.register_autograd(self.name, first_order_only, setup_context=setup_context, lib=_LIB)
        for device, kernel in self.kernels.items():
            self.functions[device] = _function(name, kernel, setup_context, first_order_only)


def _function(name: str, kernel, setup_context, backward):
    """The ``apply`` of the ``torch.autograd.Function`` of an eager call on one device: the kernel, then
    ``setup_context`` on the same inputs and output, as the registered op's autograd does. An
    output that reaches no loss (GroupNorm's statistics) gets None, not a tensor of zeros made for
    it: every backward formula takes None for an output's gradient."""

    def forward(ctx, *args):
        ctx.set_materialize_grads(False)
        output = kernel(*args)
        setup_context(ctx, args, output)
        return output

    def backward_some(ctx, *grads):
        for grad in grads:
            if grad is not None:
                return backward(ctx, *grads)
        return (None,) * len(ctx.needs_input_grad)  # no output reached a loss

    qualified = name.replace("::", "_")
    function = type(qualified, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_some),
                     "__qualname__": qualified})
    # The C++ apply itself: what Function.apply calls after its Python checks, which concern
    # torch.func transforms and a separate setup_context, neither of which a plain eager call
    # here has (they cost as much as the rest of the Function machinery).
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, function)


def kernel_op(name: str, family: str, *, cpu=None, triton=None) -> KernelOp:
    """Register ``cpu`` (the C++ kernels' caller) and ``triton`` (the Triton kernels' caller),
    annotated like a ``custom_op``'s function, as ``vdm_fast::<name>`` of op family ``family``."""
    return KernelOp(name, family, cpu, triton)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: ``t`` itself where it already is (``.to`` returns it too, but through
    a dispatch on the host, on every call: benchmarks/bench_overhead.py)."""
    return t if t.dtype == dtype else t.to(dtype)


_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in
                (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int32, torch.int64)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how the compiled kernels are told a dtype."""
    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")
