"""Ready for the card before it comes: what only a GPU would show, checked here.

- Every Triton launch runs inside a device guard entered with its tensors' device (a launch
  runs on the *current* device and stream, triton-lang/triton#2441), and no launch puts more
  than 65535 programs on a grid axis other than 0. Without a second GPU (or any): the launch
  wrappers run on FakeTensorMode tensors of ``cuda:1`` (no memory, so batches of 70000 cost
  nothing), with each kernel replaced by a recorder and ``torch.cuda.device`` by a stand-in
  that records the device it is entered with.
- The fused path copies nothing from the host and reads nothing back where a CUDA graph
  captures it (the value checks, which read data, are off there, as ``validate.values_readable``
  says under capture): a TorchDispatchMode records tensors made from host data
  (``aten.lift_fresh``), copies from the CPU to another device (``aten._to_copy``/``copy_``) and
  reads to the host (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``). On a
  CPU-only torch, FakeTensorMode cannot even make a CUDA tensor from host data (it raises "not
  linked with support for cuda devices"), so the pinned schedule's old ``new_tensor`` fails
  either way.
- float32 attention honours torch's TF32 setting; head dims the kernels cannot hold run SDPA.
- The compile gate (tests/compile_triton.py) fails on deliberately bad configurations.
"""

import contextlib
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import RTOL, assert_close, gate_tuned_triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from vdm_fast import backend, ops
from vdm_fast import nn as vnn
from vdm_fast import validate

triton = pytest.importorskip("triton", reason="triton is not installed")
from triton.runtime.jit import KernelInterface  # noqa: E402

from vdm_fast.kernels import _device, attention, attention_tiles, loss, norm, schedule  # noqa: E402
from vdm_fast.ops import attention as ops_attention  # noqa: E402
from vdm_fast.reference.attention import attention_block as reference_block  # noqa: E402

MODULES = (attention, loss, norm, schedule)
GRID_AXIS_CAP = 65535  # CUDA's limit on grid axes 1 and 2


def _launched_kernels(module):
    """Names of the kernels ``module`` launches (``name[grid](...)``)."""
    text = inspect.getsource(module)
    return [name for name, value in vars(module).items()
            if isinstance(value, KernelInterface) and re.search(rf"(?<!\w){name}\[", text)]


class _Launches:
    """Replaces every launched kernel of the modules by a recorder of (kernel, grid, the device
    of the innermost entered ``torch.cuda.device``, keyword arguments), and ``torch.cuda.device``
    by a stand-in that keeps that stack."""

    def __init__(self, monkeypatch):
        self.records, self.guards = [], []
        launches = self

        class Guard:
            def __init__(self, device):
                self.device = torch.device(device)

            def __enter__(self):
                launches.guards.append(self.device)

            def __exit__(self, *exc):
                launches.guards.pop()

        monkeypatch.setattr(torch.cuda, "device", Guard)
        self.names = []
        for module in MODULES:
            for name in _launched_kernels(module):
                self.names.append(name)
                monkeypatch.setattr(module, name, self._recorder(name))

    def _recorder(self, name):
        launches = self

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.records.append((name, grid, launches.guards[-1] if launches.guards else None, kwargs))
                return launch
        return Recorder()


def _call_every_wrapper(device, B, dtype=torch.float32):
    """Each launch wrapper of vdm_fast.kernels once (attention at head dims 64 and 256: one and
    two dK/dV launches), on tensors of ``device`` with ``B`` examples (heads)."""
    def empty(*shape, dtype=dtype):
        return torch.empty(shape, device=device, dtype=dtype)

    for d in (64, 256):
        q = empty(B, 40, d, dtype=torch.bfloat16)
        attention.flash_attention_forward(q, q, q, 0.125)
        attention.flash_attention_backward(q, q, q, q, q, empty(B, 40), 0.125)
    f, g = empty(B, 3072), empty(B)
    loss.diffuse_forward(f, f, g)
    loss.diffuse_backward(f, f, f, g)
    loss.sse_forward(f, f, g, f, g)
    loss.sse_backward(g, f, f, g, f, g)
    x = empty(B, 3072, dtype=torch.uint8)
    loss.recon_forward(x, f, g, 256)
    loss.recon_backward(g, x, f, g, 256)
    for layout in (torch.contiguous_format, torch.channels_last):
        xn = torch.empty(B, 64, 4, 4, device=device, memory_format=layout)
        w, c = empty(64), empty(B, 64)
        norm.group_norm_silu_forward(xn, w, w, c, 32, 1e-6, True)
        norm.group_norm_silu_backward(xn, xn, w, w, c, empty(B, 32), empty(B, 32), 32, True)
    params = [empty(1, 1), empty(1), empty(1024, 1), empty(1024), empty(1, 1024)]
    schedule.nnet_forward(g, *params)
    schedule.nnet_backward(g, *params, g, g)


def test_every_triton_launch_enters_its_tensors_device_and_keeps_grid_axes_1_2_small(monkeypatch):
    launches = _Launches(monkeypatch)
    device = torch.device("cuda", 1)  # not the current device (0): a launch without the guard would miss it
    with FakeTensorMode():
        _call_every_wrapper(device, B=70_000)
    assert sorted({name for name, *_ in launches.records}) == sorted(launches.names)
    unguarded = [(name, guard) for name, _, guard, _ in launches.records if guard != device]
    assert not unguarded, f"launched outside torch.cuda.device({device}): {unguarded}"
    over = [(name, grid) for name, grid, _, _ in launches.records if any(n > GRID_AXIS_CAP for n in grid[1:])]
    assert not over, f"grid axes 1/2 over {GRID_AXIS_CAP} at B = 70000: {over}"
    assert not launches.guards  # every guard was left


def test_the_guard_is_a_no_op_for_cpu_tensors(monkeypatch):
    def refuse(device):
        raise AssertionError("torch.cuda.device entered for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", refuse)
    with _device.guard(torch.zeros(1)):
        pass


class _HostTraffic(TorchDispatchMode):
    """Records what would move data between host and device: tensors made from host data,
    copies from the CPU to another device, and values read back to the host."""

    SYNCS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.item"}

    def __init__(self):
        super().__init__()
        self.events, self.seen = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.seen.add(name)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("aten.lift_fresh", "aten.lift_fresh_copy"):
            self.events.append(f"{name}: a tensor made from host data")
        elif name in self.SYNCS:
            self.events.append(f"{name}: a value read back to the host")
        elif name in ("aten._to_copy", "aten.copy_", "aten._copy_from"):
            target = kwargs.get("device") or (tensors[0].device if name == "aten.copy_" else None)
            source = tensors[1].device if name == "aten.copy_" and len(tensors) > 1 else tensors[0].device
            if target is not None and torch.device(target) != source and source.type == "cpu":
                self.events.append(f"{name}: a copy from {source} to {target}")
        return func(*args, **kwargs)


def _pinned_schedule(device, make=torch.empty):
    params = [make(s, device=device) for s in ((1, 1), (1,), (8, 1), (8,), (1, 8))]
    return params, [make(1, device=device) - 8.0, make(1, device=device) + 4.0]


def test_the_pinned_schedule_copies_nothing_from_the_host_on_a_cuda_device(monkeypatch):
    """``gamma_nnet_pinned`` on (fake) CUDA tensors as a CUDA graph captures it: no host data,
    no host read. (Forward only: a CPU-only torch's autograd engine cannot run on fake CUDA
    tensors; the next test runs the backward on the CPU.)"""
    monkeypatch.setattr(validate, "values_readable", lambda t: False)  # as under capture
    with FakeTensorMode():
        device = torch.device("cuda", 1)
        params, ends = _pinned_schedule(device)
        t = torch.empty(16, device=device)
        with _HostTraffic() as traffic:
            gamma, dgamma = ops.gamma_nnet_pinned(t, *params, *ends)
    assert gamma.device == device and dgamma.shape == (16,)
    assert not traffic.events, traffic.events


def test_the_pinned_schedule_forward_and_backward_copy_nothing_from_the_host(monkeypatch):
    monkeypatch.setattr(validate, "values_readable", lambda t: False)  # as under capture
    params, ends = _pinned_schedule("cpu", make=torch.randn)
    leaves = [p.requires_grad_() for p in (*params, *ends)]
    t = torch.rand(16)
    with _HostTraffic() as traffic:
        gamma, dgamma = ops.gamma_nnet_pinned(t, *leaves)
        grads = torch.autograd.grad((gamma + dgamma).sum(), leaves)
    assert len(grads) == 7 and all(torch.isfinite(g).all() for g in grads)
    assert not traffic.events, traffic.events


def test_the_detector_catches_a_host_copy():
    """The recorder itself: what the old ``t.new_tensor([0.0, 1.0])`` did, and ``.item()``."""
    with _HostTraffic() as traffic:
        t = torch.zeros(3)
        t.new_tensor([0.0, 1.0])
        t.sum().item()
    assert len(traffic.events) == 2, traffic.events
    if not torch.backends.cuda.is_built():
        with FakeTensorMode(), pytest.raises(RuntimeError):  # a CPU-only torch cannot even fake the copy
            torch.empty(2, device="cuda").new_tensor([0.0, 1.0])
        return
    # A CUDA build fakes it (without a GPU): the copy to the fake CUDA tensor is seen.
    with FakeTensorMode(), _HostTraffic() as fake:
        torch.empty(2, device="cuda").new_tensor([0.0, 1.0])
    assert any("a tensor made from host data" in e or "a copy from cpu to cuda" in e for e in fake.events), fake.events


@pytest.mark.slow
def test_the_fused_training_step_copies_nothing_from_the_host(monkeypatch):
    """A VDM training step (U-Net with attention, pinned learned schedule, forward and backward)
    on the fused ops, as a CUDA graph captures it: nothing the ops do between the kernels makes
    a tensor from host data or reads one back. (On the CPU the attention op runs its Triton
    kernels under the interpreter, the loss, schedule and norm ops their C++ kernels; the mode
    sees the ops and the Python around them, not the kernels' insides.)"""
    monkeypatch.setitem(backend.KERNELS["attention"], "cpu", "triton")
    monkeypatch.setattr(validate, "values_readable", lambda t: False)  # as under capture
    net = vnn.ScoreUNet(in_channels=1, n_embd=32, n_layer=1, dropout=0.0, attention="middle")
    model = vnn.VDM(net, vnn.MonotoneNetSchedule(n_features=8, pinned=True), (1, 4, 4), vocab_size=17)
    x = torch.randint(0, 17, (2, 1, 4, 4))
    with _HostTraffic() as traffic:
        out = model(x)
        model.objective(out).mean().backward()
    fused = {"vdm_fast.gamma_nnet", "vdm_fast.gamma_nnet_backward", "vdm_fast.group_norm_silu",
             "vdm_fast.flash_attention", "vdm_fast.flash_attention_backward", "vdm_fast.diffuse",
             "vdm_fast.sum_squared_error", "vdm_fast.reconstruction_loss"}
    assert fused <= traffic.seen, f"the step did not run these fused ops: {sorted(fused - traffic.seen)}"
    assert not traffic.events, traffic.events


# --- float32 precision and the SDPA route ---------------------------------------------------

@contextlib.contextmanager
def _float32_matmul_precision(value):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision, products", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_attention_follows_torchs_tf32_setting(precision, products, monkeypatch):
    launches = _Launches(monkeypatch)
    q = torch.randn(1, 16, 32)
    with _float32_matmul_precision(precision):
        assert attention_tiles.kind(torch.float32) == products
        attention.flash_attention_forward(q, q, q, 0.125)
        attention.flash_attention_backward(q, q, q, q, q, torch.zeros(1, 16), 0.125)
    assert {kwargs["PRECISION"] for *_, kwargs in launches.records} == {products}
    # bf16 products are bf16 whatever the float32 setting
    assert attention_tiles.kind(torch.bfloat16) == "half"


def test_head_dims_past_the_kernels_are_routed_to_sdpa():
    """The U-Net's head dim is its width (one head): widths past 256 (and 160..256 in TF32,
    where every tile set spilled) leave the kernels."""
    for dtype, tf32, fits, past in ((torch.bfloat16, None, 256, 288), (torch.float16, None, 256, 512),
                                    (torch.float32, False, 256, 288), (torch.float32, True, 128, 160)):
        assert attention_tiles.supported(dtype, fits, tf32=tf32)
        assert not attention_tiles.supported(dtype, past, tf32=tf32)
    # Called directly, the op still runs TF32 head dims past the TF32 tiles, on the full-float32
    # ones; past 256 it refuses rather than launch tiles that cannot fit in shared memory.
    assert attention_tiles.choose(torch.float32, 256, tf32=True)[0] == "ieee"
    with pytest.raises(ValueError, match="head dims up to 256, got 512"):
        attention_tiles.choose(torch.bfloat16, 512)


def test_the_fused_block_runs_sdpa_where_the_kernels_do_not_take_the_head_dim(monkeypatch):
    def refuse(*args):
        raise AssertionError("the flash-attention kernels ran for a head dim they do not take")

    monkeypatch.setitem(attention_tiles.DEFAULT, "ieee", {})  # no head dim in full float32
    monkeypatch.setattr(ops_attention, "_flash_attention", refuse)
    x = torch.randn(2, 16, 3, 5)
    params = [torch.randn(16), torch.randn(16), torch.randn(48, 16) / 4, torch.randn(48), torch.randn(16, 16) / 4,
              torch.randn(16)]
    with _float32_matmul_precision("highest"):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        y = ops_attention._attention_block_fused(*leaves, 2, 8, 1e-6)
        grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, *params)]
    y_ref = reference_block(*ref_leaves, 2, 8, 1e-6)
    ref_grads = torch.autograd.grad(y_ref.square().sum(), ref_leaves)
    assert_close(y, y_ref, RTOL[torch.float32] * 20, "y")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, RTOL[torch.float32] * 50)


def _tile_sets():
    """Every distinct tile set of the table (the interpreter ignores warps and stages)."""
    seen = {}
    for kind, table in attention_tiles.VARIANTS.items():
        for bd, variants in table.items():
            for name, tiles in variants.items():
                key = (tiles.fwd[:2], tiles.dkdv[:2], tiles.dq[:2], tiles.split_dkdv)
                seen.setdefault(key, (f"{kind}-{bd}-{name}", tiles))
    return list(seen.values())


@pytest.mark.parametrize("name, tiles", _tile_sets(), ids=[n for n, _ in _tile_sets()])
def test_every_tile_variant_matches_sdpa(name, tiles, poisoned):
    """The variants the GPU check times (benchmarks/bench_attention_tiles.py) compute the same
    attention: 150 tokens (more than one block of every size, the last one partial), head dim 24
    (masked columns)."""
    poisoned(attention)
    BH, N, d = 2, 150, 24
    q, k, v, do = (torch.randn(BH, N, d) for _ in range(4))
    o, lse = attention.flash_attention_forward(q, k, v, d ** -0.5, variant=tiles)
    grads = attention.flash_attention_backward(do, q, k, v, o, lse, d ** -0.5, variant=tiles)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    assert_close(o, ref, RTOL[torch.float32] * 10, "o")
    for a, b, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_close(a, b, RTOL[torch.float32] * 20, what)


# --- the compile gate fails where it must ---------------------------------------------------

def _gate(*args):
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_triton.py")
    out = subprocess.run([sys.executable, "-P", script, "--arch", "90", *args], capture_output=True, text=True,
                         env=env, cwd="/", timeout=600)
    return out.returncode, out.stdout


def test_the_gate_fails_32x32_bf16_attention_tiles_for_want_of_wgmma():
    rc, out = _gate("--only", "_attn_fwd", "--dtypes", "bfloat16", "--head-dims", "64", "--attention-tiles",
                    "32", "32", "4", "1")
    assert rc == 1 and "no wgmma" in out and "nvidia_mma versionMajor = 2" in out, out
    assert out.strip().splitlines()[-1] == "1 variants compiled for sm_90, 1 failed", out


@gate_tuned_triton
def test_the_gate_fails_a_dkdv_tile_that_spills():
    """bf16 dK/dV at head dim 256 in one launch (both accumulators, K and V in registers)."""
    rc, out = _gate("--only", "_attn_bwd_dkdv", "--dtypes", "bfloat16", "--head-dims", "256", "--attention-tiles",
                    "32", "64", "8", "2")
    assert rc == 1 and re.search(r"spills \d+ B/thread, over the bound of 0 B", out), out


def test_the_gates_int64_and_vector_load_checks_catch_their_bugs():
    """A row base ``program_id * D`` in int32 (the old loss kernels) and a channels_last tile
    with a runtime channel count (the old GroupNorm: scalar 2-byte loads) fail; their fixes pass."""
    rc, out = _gate("--self-test")
    assert rc == 0 and out.count("as it must") == 4, out
    assert out.strip().splitlines()[-1] == "self-test for sm_90: 0 missed", out


def test_the_gpu_check_times_the_tile_variants_against_sdpa():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "gpu_check.sh")) as f:
        assert "benchmarks/bench_attention_tiles.py" in f.read()
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_attention_tiles.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--budget-s" in out.stdout, out.stderr


# --- on a card (benchmarks/gpu_check.sh runs these) -----------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@requires_cuda
def test_cuda_the_pinned_schedule_and_the_attention_block_replay_in_a_cuda_graph():
    """Captured once, replayed on new inputs: no host copy or sync may happen in between."""
    dev = torch.device("cuda")
    params, ends = _pinned_schedule(dev, make=torch.randn)
    t = torch.rand(64, device=dev)
    C = 128
    x = torch.randn(4, C, 16, 16, device=dev, dtype=torch.bfloat16)
    block = [torch.randn(C, device=dev), torch.randn(C, device=dev), torch.randn(3 * C, C, device=dev) / C ** 0.5,
             torch.randn(3 * C, device=dev), torch.randn(C, C, device=dev) / C ** 0.5, torch.randn(C, device=dev)]
    block = [p.to(torch.bfloat16) for p in block]

    def step():
        return (*ops.gamma_nnet_pinned(t, *params, *ends), ops.attention_block(x, *block, num_heads=1))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) off the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    t.copy_(torch.rand(64, device=dev))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):  # the replay saw the new inputs
        assert_close(got.float(), want.float(), RTOL[want.dtype])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_ops_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(4, 64, 8, 8, device=dev).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, device=dev), torch.randn(64, device=dev)
    y = ops.group_norm_silu(x, w, b, 32)
    assert_close(y.cpu(), ops.group_norm_silu(x.cpu(), w.cpu(), b.cpu(), 32), RTOL[torch.float32] * 10)
    q = torch.randn(2, 100, 64, device=dev)
    o, _ = torch.ops.vdm_fast.flash_attention(q, q, q, 0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q.cpu().double(), q.cpu().double(), q.cpu().double(),
                                                           scale=0.125)
    assert_close(o.cpu(), ref, RTOL[torch.float32] * 10)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_cuda_float32_attention_in_either_precision_matches_sdpa(precision):
    """Full float32 (FMA) and TF32 (wgmma) products: TF32 rounds the operands to 10 bits."""
    q, k, v, do = (torch.randn(4, 300, 64, device="cuda") for _ in range(4))
    with _float32_matmul_precision(precision):
        o, lse = torch.ops.vdm_fast.flash_attention(q, k, v, 0.125)
        grads = torch.ops.vdm_fast.flash_attention_backward(do, q, k, v, o, lse, 0.125)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, scale=0.125)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    tol = RTOL[torch.float32] * 20 if precision == "highest" else 5e-3
    assert_close(o, ref, tol, "o")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, tol * 4)
