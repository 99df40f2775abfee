"""The ops' cheap host path: a plain eager call runs the kernel functions directly (no dispatcher
round trip), and must compute what the registered ``vdm_fast::`` op computes; anything that
observes or transforms the call still sees the registered op; the backend's kept decisions
follow every change; the C++ kernels' serial path for small work gives the parallel path's bits."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vdm_fast import backend, ops
from vdm_fast.ops import loss as ops_loss
from vdm_fast.ops import norm as ops_norm
from vdm_fast.ops import schedule as ops_schedule

needs_cpp = pytest.mark.skipif(backend.cpu_kernels is None, reason="vdm_fast._C not built")


def _cases():
    """Each op with kernels on the CPU: (KernelOp, its arguments in float64, which need grad)."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x_int = torch.randint(0, 17, (3, 2, 4, 4), generator=g)
    return {
        "group_norm_silu": (ops_norm._group_norm_silu, (randn(3, 8, 4, 5) + 1, randn(8), randn(8), randn(3, 8), 4,
                                                        1e-6, True)),
        "diffuse": (ops_loss._diffuse, (randn(3, 2, 4, 4), randn(3, 2, 4, 4), randn(3))),
        "sum_squared_error": (ops_loss._sse, (randn(3, 2, 4, 4), randn(3, 2, 4, 4), randn(3), randn(3, 2, 4, 4),
                                              randn(3))),
        "reconstruction_loss": (ops_loss._reconstruction_loss, (x_int, randn(3, 2, 4, 4), randn(3) - 5, 17)),
        "gamma_nnet": (ops_schedule._gamma_nnet, (torch.rand(5, generator=g, dtype=torch.float64), randn(1, 1),
                                                  randn(1), randn(16, 1), randn(16), randn(1, 16))),
    }


def _outputs_and_grads(call, args, cotangents=None):
    leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    out = call(*leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    first = outs[0]  # the op's main output: GroupNorm's y (its statistics carry no gradient)
    cotangent = cotangents if cotangents is not None else torch.randn(first.shape, dtype=first.dtype,
                                                                      generator=torch.Generator().manual_seed(2))
    differentiable = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(first, differentiable, cotangent, allow_unused=True)
    return [o.detach() for o in outs], grads, cotangent


@needs_cpp
@pytest.mark.parametrize("name", list(_cases()))
def test_an_eager_call_computes_what_the_registered_op_computes(name, poisoned):
    """The direct path (KernelOp) and the dispatcher's path (torch.ops.vdm_fast) run the same
    kernel functions and formulas: the same bits, forward and backward (float64, random inputs,
    the kernels' allocations NaN-poisoned so an unwritten element shows)."""
    op, args = _cases()[name]
    poisoned(ops_loss if name in ("diffuse", "sum_squared_error", "reconstruction_loss") else
             ops_norm if name == "group_norm_silu" else ops_schedule)
    eager_out, eager_grads, cotangent = _outputs_and_grads(op, args)
    registered_out, registered_grads, _ = _outputs_and_grads(op.overload, args, cotangent)
    for a, b in zip(eager_out, registered_out):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    assert len(eager_grads) == len(registered_grads)
    for a, b in zip(eager_grads, registered_grads):
        assert (a is None) == (b is None) and (a is None or (torch.isfinite(a).all() and torch.equal(a, b)))


@needs_cpp
def test_an_output_that_reaches_no_loss_counts_as_zero():
    """gamma_nnet's gamma' unused: the eager path passes None for its gradient, the registered
    op zeros; both give the same gradients."""
    op, args = _cases()["gamma_nnet"]
    grads = []
    for call in (op, op.overload):
        leaves = [a.clone().requires_grad_() for a in args]
        grads.append(torch.autograd.grad(call(*leaves)[0].sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert grads[0][2].abs().sum() > 0  # the network's weights get a gradient from gamma alone


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


class _SeenFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


@needs_cpp
@pytest.mark.parametrize("mode", [_SeenOps, _SeenFunctions])
def test_whatever_observes_the_call_sees_the_registered_op(mode):
    """A dispatch mode (make_fx, FlopCounterMode, opcheck) or a torch function mode sees
    ``vdm_fast::group_norm_silu`` itself, forward and backward, not the kernel's Python inside."""
    x, w, b = torch.randn(2, 8, 3, 3, requires_grad=True), torch.randn(8), torch.randn(8)
    with mode() as m:
        ops.group_norm_silu(x, w, b, 4).sum().backward()
    expected = {"vdm_fast.group_norm_silu.default"}
    if mode is _SeenOps:  # a torch function mode is not consulted inside the autograd engine's backward
        expected.add("vdm_fast.group_norm_silu_backward.default")
    assert expected <= m.seen
    assert not any("empty_like" in name for name in m.seen)  # the kernel's allocations stayed inside the op


def test_fake_tensors_take_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        x = fake.from_tensor(torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last))
        y = ops.group_norm_silu(x, fake.from_tensor(torch.randn(8)), fake.from_tensor(torch.randn(8)), 4)
        loss = ops.diffusion_loss(fake.from_tensor(torch.randn(2, 3)), fake.from_tensor(torch.randn(2, 3)),
                                  fake.from_tensor(torch.rand(2)))
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last) and loss.shape == (2,)


def test_the_backend_decision_is_kept_until_the_choice_or_a_table_changes(monkeypatch):
    cpu, x = torch.device("cpu"), torch.randn(2)
    expected = "cpp" if backend.cpu_kernels is not None else "reference"
    assert backend.implementation("norm", cpu, x.dtype) == expected
    with backend.use("reference"):
        assert backend.implementation("norm", cpu, x.dtype) == "reference"
    assert backend.implementation("norm", cpu, x.dtype) == expected
    monkeypatch.setitem(backend.KERNELS["norm"], "cpu", "torch")
    assert backend.implementation("norm", cpu, x.dtype) == "torch"
    monkeypatch.setitem(backend.KERNEL_DTYPES, ("norm", "torch"), (torch.float64,))
    assert backend.implementation("norm", cpu, x.dtype) == "reference"
    monkeypatch.undo()
    assert backend.implementation("norm", cpu, x.dtype) == expected


@needs_cpp
def test_cpu_kernels_give_the_same_bits_serial_and_on_two_threads():
    """Above parallel.h's grain (32768 elements of work) the kernels run on OpenMP's threads,
    below it on the calling thread alone. Examples are independent items (their sums over the
    batch reduced in a fixed order), so an example computed in a batch below the grain and in one
    above it on two threads has the same bits, and so do a batch's results on one and two threads."""
    g = torch.Generator().manual_seed(3)
    B = 4  # the small batch is the first example: 1/4 of the work, below the grain
    x, w, b, c = torch.randn(B, 64, 16, 16, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g), \
        torch.randn(B, 64, generator=g)
    f, eps, gamma = torch.randn(B, 3, 64, 64, generator=g), torch.randn(B, 3, 64, 64, generator=g), \
        torch.randn(B, generator=g)
    x_int, eps_0 = torch.randint(0, 256, (B, 3, 16, 16), generator=g), torch.randn(B, 3, 16, 16, generator=g)
    t = torch.rand(64, generator=g)
    net = [torch.randn(*s, generator=g) for s in ((1, 1), (1,), (1024, 1), (1024,), (1, 1024))]

    def per_example(rows):
        """The ops' per-example results for the examples ``rows``."""
        y, mean, rstd = ops_norm._group_norm_silu_cpu(x[rows], w, b, c[rows], 32, 1e-6, True)
        dx, _, _, dc = ops_norm._group_norm_silu_backward_cpu(torch.ones_like(y), x[rows], w, b, c[rows], mean, rstd,
                                                              32, True)
        df, de, dg = ops_loss._diffuse_backward_cpu(f[rows], f[rows], eps[rows], gamma[rows])
        grad_x, grad_a, _ = ops_loss._sse_backward_cpu(gamma[rows], f[rows], eps[rows], gamma[rows], None, None)
        return [y, mean, rstd, dx, dc, ops_loss._diffuse_cpu(f[rows], eps[rows], gamma[rows]), df, de, dg,
                ops_loss._sse_cpu(f[rows], eps[rows], gamma[rows], None, None), grad_x, grad_a,
                ops_loss._recon_cpu(x_int[rows], eps_0[rows], gamma[rows] - 6, 256),
                *ops_loss._recon_backward_cpu(gamma[rows], x_int[rows], eps_0[rows], gamma[rows] - 6, 256),
                *ops_schedule._gamma_nnet_cpu(t[rows.start * 16:rows.stop * 16], *net)]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = per_example(slice(0, B))
        torch.set_num_threads(2)
        two_threads, first_alone = per_example(slice(0, B)), per_example(slice(0, 1))
    finally:
        torch.set_num_threads(before)
    for i, (a, b_, small) in enumerate(zip(one_thread, two_threads, first_alone)):
        assert torch.isfinite(a).all() and torch.equal(a, b_), f"result {i}: 1 and 2 threads differ"
        assert torch.equal(a[:small.shape[0]], small), f"result {i}: the example alone differs"
