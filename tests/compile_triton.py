"""The compile gate: every Triton kernel variant the ops launch, compiled for a CUDA card on a
machine without one, exactly as Triton's JIT would compile it there, and checked.

The kernels' launch wrappers (``vdm_fast.kernels.*``) run on CPU tensors with every kernel's
launch replaced by a recorder. Each recorded launch goes through the JIT's own binder and
attribute packing (``create_function_from_signature`` and ``JITFunction._pack_args`` of the
installed Triton, with the NVIDIA backend of the target): ints equal to 1 become constexprs,
ints and pointers divisible by 16 get their divisibility hints, as at a real launch. Each
distinct specialisation is compiled with ``triton.compile`` for the target and must pass:

- shared memory within the card's per-block limit (a launch over it fails);
- ptxas spill stores at most ``--spill-bound`` bytes per thread (``SPILL_BOUND``);
- on sm_90, every bf16/fp16/tf32 matrix product on Hopper's warpgroup MMA: no ``tt.dot`` left in
  the TTGIR (an mma.sync or FMA fallback) and ``wgmma.mma_async`` in the PTX;
- 64-bit address arithmetic where a row base can pass 2^31 elements (``INT64_BASE``): a
  program index sign-extended to i64 and multiplied in i64 (TTIR);
- GroupNorm's loads of x vectorised as far as the layout allows: ``min(16 B, contiguous
  elements x element size)`` bytes, contiguous = channels per group (channels_last) or pixels
  (NCHW), and no scalar 16-bit load of a bf16/fp16 tensor.

Head dims: every one the U-Net configs reach (``n_embd / heads``, multiples of 32), up to the
largest the kernels take; a larger one must be routed to SDPA (``attention_tiles.supported``).
It does not check numbers; the CUDA parity tests do that on a card.

    python tests/compile_triton.py [--arch 90] [--only REGEX] ...    (TRITON_INTERPRET unset)

Run by tests/test_build.py in a subprocess, because the test session imports triton under the
interpreter. The last line is ``N variants compiled for sm_ARCH, F failed``.
"""

import argparse
import contextlib
import inspect
import io
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton.py compiles for a card: run it with TRITON_INTERPRET unset")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from vdm_fast.kernels import attention, attention_tiles, loss, norm, schedule  # noqa: E402

# Shared memory one block may use (the opt-in maximum), per compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Spill stores per thread a variant may have: none. A spill is a local-memory round trip per
# use; the variants that would spill are not launched (head dims the attention kernels cannot
# hold go to SDPA).
SPILL_BOUND = 0
# Kernels whose row base (example or head index x its size) may pass 2^31 elements.
INT64_BASE = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_gn_fwd", "_gn_bwd", "_diffuse_fwd",
              "_diffuse_bwd", "_sse_fwd", "_sse_bwd", "_recon_fwd", "_recon_bwd"}
ELEMENT_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, grid, args, kwargs))


def jit_source(kernel, args, kwargs, target):
    """``(key, source, options)`` of one launch as the JIT builds it for ``target``: its binder's
    specialisation (types, constexprs, divisibility attributes) and its option parsing."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    # What JITFunction.run adds before binding (the fpsan knob since Triton 3.9; 3.8 has none).
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound_args, specialization, options = binder(*args, **kwargs)
    key = (kernel.__name__, str(specialization), str(options))
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return key, ASTSource(kernel, signature, constexprs, attrs), options


def ptxas_report(ptx: str, arch: int) -> str:
    """ptxas's ``-v`` report with the flags Triton's NVIDIA backend passes (when the compile
    came from Triton's cache, which skips ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", os.path.join(tmp, "kernel.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True).stderr


def compile_variant(source, target, options):
    """``(compiled, ptxas report)``; the report is Triton's own ptxas log where it ran ptxas."""
    log = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    report = log.getvalue()
    if "registers" not in report:
        report = ptxas_report(compiled.asm["ptx"], target.arch)
    return compiled, report


# --- the checks ---------------------------------------------------------------------------

def usage(report: str):
    """``(registers, spill stores in bytes)`` per thread from a ptxas report (None: not found)."""
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def tensor_core_dots(ttir: str) -> int:
    """Matrix products of the TTIR that belong on the tensor cores: 16-bit operands, or float32
    ones with ``inputPrecision = tf32``."""
    n = 0
    for line in ttir.splitlines():
        if "tt.dot " not in line:
            continue
        operands = re.search(r":\s*tensor<[^>]*x(\w+)>", line)
        if operands and operands.group(1) in ("bf16", "f16"):
            n += 1
        elif "inputPrecision = tf32" in line:
            n += 1
    return n


def check_wgmma(asm: dict) -> str:
    """'' or why the tensor-core products of a kernel do not run on wgmma."""
    if not tensor_core_dots(asm["ttir"]):
        return ""
    fallback = len(re.findall(r"= tt\.dot ", asm["ttgir"]))
    if fallback or "wgmma.mma_async" not in asm["ptx"]:
        version = re.search(r"versionMajor = (\d)", asm["ttgir"])
        return (f"no wgmma: {fallback} product(s) left on mma.sync/FMA "
                f"(nvidia_mma versionMajor = {version.group(1) if version else '?'})")
    return ""


def check_int64_base(ttir: str) -> str:
    """'' or why the kernel's row base is 32-bit: it needs a program index sign-extended to i64
    and an i64 multiply."""
    pids = set(re.findall(r"(%\w+) = tt\.get_program_id", ttir))
    # Values computed from a program index (one level: divisions and remainders of the grid).
    derived = set(pids)
    for out, arg in re.findall(r"(%\w+) = arith\.(?:divsi|remsi|divui|remui) (%\w+)", ttir):
        if arg in derived:
            derived.add(out)
    extended = [a for a in re.findall(r"= arith\.extsi (%\w+) : i32 to i64", ttir) if a in derived]
    if not extended or not re.search(r"= arith\.muli [^\n]*: i64", ttir):
        return "32-bit row base: no program index extended to i64 and multiplied in i64 (TTIR)"
    return ""


def global_loads(ptx: str):
    """Bytes of every ``ld.global`` of the PTX."""
    return [int(m.group(1) or 1) * int(m.group(2)) // 8
            for m in re.finditer(r"ld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx)]


def tile_loads(ttgir: str):
    """``(element type, elements per thread along the contiguous axis)`` of every 2-d
    ``tt.load`` of the TTGIR (GroupNorm's: the x and dy tiles), from its blocked layout."""
    layouts = {}
    for name, size, order in re.findall(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*?"
                                        r"order = \[([\d, ]+)\]", ttgir, re.M):
        size, order = [int(v) for v in size.split(",")], [int(v) for v in order.split(",")]
        layouts[name] = size[order[0]]
    return [(elem, layouts.get(layout, 1))
            for elem, layout in re.findall(r"= tt\.load [^\n]*: tensor<\d+x\d+x!tt\.ptr<(\w+)>, (#\w+)>", ttgir)]


def check_vector_loads(asm: dict, dtype: torch.dtype, contiguous: int) -> str:
    """'' or why a GroupNorm variant loads x (and dy) narrower than its layout allows: every 2-d
    load (the x and dy tiles) must hold ``min(16 B, contiguous elements x element size)`` per
    thread along the contiguous axis (its TTGIR layout, which the PTX's vector width follows),
    and the PTX must have loads that wide."""
    elem = ELEMENT_BYTES[dtype]
    want = min(16, contiguous * elem)
    tiles = tile_loads(asm["ttgir"])
    if not tiles:
        return "scalar loads: no 2-d tile load in the TTGIR"
    narrow = [n * elem for _, n in tiles if n * elem < want]
    if narrow:
        return (f"scalar loads: {len(narrow)} of {len(tiles)} tile loads of x/dy hold {min(narrow)} B a thread, "
                f"the layout allows {want} B")
    if max(global_loads(asm["ptx"]), default=0) < want:
        return f"scalar loads: no ld.global of {want} B in the PTX"
    return ""


# --- what the ops launch ------------------------------------------------------------------

def head_dims():
    """Head dims of the attention blocks the U-Net configs reach: ``n_embd / heads`` with
    ``n_embd`` a multiple of 32 (the presets and every width up to 512) and one head (the
    U-Net's ``AttnBlock``), plus tests/ops/test_attention.py's CUDA head counts."""
    from vdm_fast.config import DATASET_DEFAULTS
    dims = {cfg["n_embd"] for cfg in DATASET_DEFAULTS.values()} | set(range(32, 513, 32))
    dims |= {128 // 2, 256 // 4, 256 // 8}
    return sorted(dims)


# Head dims of other callers of the op (the interpreter tests' shapes): below 16, and one not a
# multiple of 16 (no divisibility hint, masked columns); their default variant only.
OTHER_HEAD_DIMS = (8, 40)


def attention_cases(head_dim_filter=None):
    """``(dtype, tf32, d, variant)`` of every attention launch: each kind's every variant at each
    head dim the kernels take; ``routed``: ``(dtype, tf32, d)`` past them (SDPA's)."""
    cases, routed = [], []
    for dtype, tf32 in ((torch.bfloat16, None), (torch.float16, None), (torch.float32, True),
                        (torch.float32, False)):
        kind = attention_tiles.kind(dtype, tf32)
        for d in head_dims() + list(OTHER_HEAD_DIMS):
            if head_dim_filter and d not in head_dim_filter:
                continue
            bd = attention_tiles.block_d(d)
            if bd not in attention_tiles.DEFAULT[kind]:
                routed.append((dtype, tf32, d))
                continue
            if d in OTHER_HEAD_DIMS:  # the variant the wrappers choose
                cases.append((dtype, tf32, d, None))
            else:
                cases.extend((dtype, tf32, d, name) for name in attention_tiles.VARIANTS[kind][bd])
    return cases, routed


def launch_all(args):
    """Every kernel variant the ops use: dtypes, flags, layouts and block shapes."""
    B = 3
    for dtype in (torch.float32, torch.float64):
        params = [torch.randn(1, 1, dtype=dtype), torch.randn(1, dtype=dtype), torch.randn(1024, 1, dtype=dtype),
                  torch.randn(1024, dtype=dtype), torch.randn(1, 1024, dtype=dtype)]
        t, g = torch.rand(B, dtype=dtype), torch.randn(B, dtype=dtype)
        schedule.nnet_forward(t, *params)
        schedule.nnet_backward(t, *params, g, g)
        f = torch.randn(B, 3072, dtype=dtype)
        loss.diffuse_forward(f, f, g)
        loss.diffuse_backward(f, f, f, g)
        for x in (torch.randint(0, 256, (B, 3072), dtype=torch.uint8), torch.randint(0, 256, (B, 3072)),
                  torch.randint(0, 256, (B, 3072)).to(dtype)):
            loss.recon_forward(x, f, g, 256)
            loss.recon_backward(g, x, f, g, 256)
        for pred_dtype in {dtype, torch.bfloat16, torch.float16}:
            pred = f.to(pred_dtype)
            for y, a, w, c in ((None,) * 4, (f, None, None, None), (f, g, f, g)):
                loss.sse_forward(pred, y, a, w, c)
                loss.sse_backward(g, pred, y, a, w, c)
    forced = attention_tiles.Tiles(*(tuple(args.attention_tiles),) * 3, split_dkdv=args.split_dkdv) \
        if args.attention_tiles else None
    cases, routed = attention_cases(set(args.head_dims) if args.head_dims else None)
    for dtype, tf32, d, variant in cases:
        q = torch.randn(2, 40, d, dtype=dtype)
        lse = torch.zeros(2, 40)
        attention.flash_attention_forward(q, q, q, d ** -0.5, variant=forced or variant, tf32=tf32)
        attention.flash_attention_backward(q, q, q, q, q, lse, d ** -0.5, variant=forced or variant, tf32=tf32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for layout in (torch.contiguous_format, torch.channels_last):
            # (channels, groups, size): the U-Net's widths 64..512 at 32 groups (2..16 channels a
            # group), one that is no power of two (3: masked channels), one group of 64 (the
            # widest channel tile), at the resolutions it runs (32, 64) and a small one.
            shapes = [(128, 32, 32), (64, 32, 16), (256, 32, 8), (512, 32, 32), (96, 32, 8), (64, 1, 8)]
            if dtype == torch.float64:
                shapes = shapes[:1]
            for C, groups, size in shapes:
                w, b = torch.randn(C), torch.randn(C)
                x = torch.randn(B, C, size, size, dtype=dtype).contiguous(memory_format=layout)
                # Every flag combination at the first shape; the U-Net's three elsewhere.
                flags = [(c, s) for c in (False, True) for s in (True, False)] if (C, size) == (128, 32) else \
                    [(True, True), (False, True), (False, False)]
                for has_cond, silu in flags:
                    cond = torch.randn(B, C, dtype=dtype) if has_cond else None
                    norm.group_norm_silu_forward(x, w, b, cond, groups, 1e-6, silu)
                    norm.group_norm_silu_backward(x, x, w, b, cond, torch.zeros(B, groups), torch.ones(B, groups),
                                                  groups, silu)
    return routed


def norm_contiguous(constexprs, args):
    """Contiguous, aligned elements of x a GroupNorm tile row may load at once: the group's
    channels (channels_last: its start is a multiple of the channels per group, so the largest
    power of two dividing them) or pixels (NCHW: aligned where the JIT's divisibility hint says
    ``H*W`` is a multiple of 16), capped by the tile."""
    if constexprs["CHANNELS_LAST"]:
        cpg = constexprs["CPG"]
        return min(cpg & -cpg, constexprs["BLOCK_C"])
    return min(constexprs["BLOCK_P"], 16) if args["HW"] % 16 == 0 else 1


def check(name, compiled, report, call_args, constexprs, arch, spill_bound, shared_limit):
    """The failures of one compiled variant (empty: it passes)."""
    problems = []
    if compiled.metadata.shared > shared_limit:  # the launch would fail with OutOfResources
        problems.append(f"{compiled.metadata.shared} B of shared memory, over sm_{arch}'s {shared_limit}")
    regs, spills = usage(report)
    if spills is None:
        problems.append("no ptxas report")
    elif spills > spill_bound:
        problems.append(f"spills {spills} B/thread, over the bound of {spill_bound} B")
    if arch >= 90:
        problems.append(check_wgmma(compiled.asm))
    if name in INT64_BASE:
        problems.append(check_int64_base(compiled.asm["ttir"]))
    if name in ("_gn_fwd", "_gn_bwd"):
        problems.append(check_vector_loads(compiled.asm, call_args["x_ptr"].dtype,
                                           norm_contiguous(constexprs, call_args)))
    return [p for p in problems if p], regs, spills


# --- the checks' own test: kernels each check must fail, next to ones it must pass ----------

@triton.jit
def _row_base_i32(x_ptr, y_ptr, D, BLOCK: tl.constexpr):
    """The old loss kernels' row base: ``b * D`` in int32, wrapping past 2^31 elements."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + b * D + offs, tl.load(x_ptr + b * D + offs))


@triton.jit
def _row_base_i64(x_ptr, y_ptr, D, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + b * D + offs, tl.load(x_ptr + b * D + offs))


@triton.jit
def _channels_last_tile(x_ptr, y_ptr, C, HW, cpg, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        CPG: tl.constexpr):
    """A channels_last tile of one group: with ``CPG = 0`` its channels per group are a runtime
    value (the old GroupNorm: the channel mask and start unknown, scalar loads), else a constexpr."""
    g = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    if CPG == 0:
        start, c_mask = g * cpg, cc < cpg
    else:
        start, c_mask = g * CPG, tl.full((BLOCK_C,), 1, tl.int1)
    offs = p[None, :] * C + (start + cc)[:, None]
    mask = c_mask[:, None] & (p < HW)[None, :]
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0) * 2, mask=mask)


def self_test(target) -> int:
    """Each check on a kernel it must fail and one it must pass; returns the misses."""
    x = torch.zeros(4096, dtype=torch.bfloat16)
    cases = [("int64 row base", _row_base_i32, (x, x, 1024), {"BLOCK": 1024}, True),
             ("int64 row base", _row_base_i64, (x, x, 1024), {"BLOCK": 1024}, False),
             ("vector loads", _channels_last_tile, (x, x, 128, 1024, 4), dict(BLOCK_C=4, BLOCK_P=256, CPG=0), True),
             ("vector loads", _channels_last_tile, (x, x, 128, 1024, 4), dict(BLOCK_C=4, BLOCK_P=256, CPG=4), False)]
    misses = 0
    for what, kernel, call_args, kwargs, bad in cases:
        _, source, options = jit_source(kernel, call_args, kwargs, target)
        compiled, _ = compile_variant(source, target, options)
        if what == "int64 row base":
            verdict = check_int64_base(compiled.asm["ttir"])
        else:
            verdict = check_vector_loads(compiled.asm, torch.bfloat16, 4)
        ok = bool(verdict) == bad
        misses += not ok
        print(f"self-test {what}, {kernel.__name__}[{kwargs}]: {'caught' if bad else 'passed'}"
              f"{' as it must' if ok else ': WRONG'}{f' ({verdict})' if verdict else ''}")
    return misses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80")
    parser.add_argument("--spill-bound", type=int, default=SPILL_BOUND, help="spill bytes per thread allowed")
    parser.add_argument("--only", default=None, help="compile only kernels whose name matches this regex")
    parser.add_argument("--dtypes", nargs="*", default=None, help="compile only variants whose first tensor "
                        "has one of these dtypes (float32 bfloat16 float16 float64 ...)")
    parser.add_argument("--head-dims", nargs="*", type=int, default=None, help="attention head dims to compile")
    parser.add_argument("--attention-tiles", nargs=4, type=int, default=None, metavar=("M", "N", "WARPS", "STAGES"),
                        help="launch every attention kernel with these tiles instead of the variants "
                             "(to see what the gate says about a configuration)")
    parser.add_argument("--split-dkdv", action="store_true", help="with --attention-tiles: dK and dV in two launches")
    parser.add_argument("--self-test", action="store_true", help="only check the checks: on kernels made to "
                        "fail them (an int32 row base, scalar channels_last loads) and their fixed twins")
    args = parser.parse_args(argv)
    if args.self_test:
        misses = self_test(GPUTarget("cuda", args.arch, 32))
        print(f"self-test for sm_{args.arch}: {misses} missed")
        return 1 if misses else 0
    calls, launched = [], []
    for module in (attention, loss, norm, schedule):
        text = inspect.getsource(module)
        for name, value in vars(module).copy().items():
            # The launched kernels (``name[grid](...)`` in the module), not the jit helpers they call.
            if isinstance(value, triton.runtime.jit.JITFunction) and re.search(rf"(?<!\w){name}\[", text):
                launched.append((module, name, value))
                setattr(module, name, Recorder(value, calls))
    try:
        routed = launch_all(args)
    finally:
        for module, name, value in launched:
            setattr(module, name, value)
    never = {name for _, name, value in launched} - {kernel.__name__ for kernel, _, _, _ in calls}
    if never and not (args.only or args.dtypes or args.head_dims):
        print(f"kernels launch_all() never launched: {sorted(never)}")
        return 1
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype, tf32, d in routed:  # past the kernels: the fused block must send them to SDPA
        if attention_tiles.supported(dtype, d, tf32=tf32):
            failures += 1
            print(f"attention {dtype} d={d}: FAILED: neither compiled nor routed to SDPA")
    if routed:
        kinds = {}
        for dtype, tf32, d in routed:
            kinds.setdefault(attention_tiles.kind(dtype, tf32), {})[d] = None
        print("head dims routed to scaled_dot_product_attention: "
              + "; ".join(f"{kind} d={','.join(map(str, ds))}" for kind, ds in kinds.items()))
    variants = {}
    for kernel, grid, call_args, call_kwargs in calls:
        if args.only and not re.search(args.only, kernel.__name__):
            continue
        first = next(a for a in call_args if isinstance(a, torch.Tensor))
        if args.dtypes and str(first.dtype).removeprefix("torch.") not in args.dtypes:
            continue
        key, source, options = jit_source(kernel, call_args, call_kwargs, target)
        bound = dict(zip(kernel.arg_names, call_args), **call_kwargs)
        variants.setdefault(key, (kernel, source, options, bound))
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    for (name, _, _), (kernel, source, options, bound) in variants.items():
        constexprs = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr and p.name in bound}
        label = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        types = ", ".join(v for k, v in source.signature.items() if v != "constexpr")
        launch = f"w{options.num_warps}s{options.num_stages}"
        try:
            compiled, report = compile_variant(source, target, options)
            problems, regs, spills = check(name, compiled, report, bound, constexprs, args.arch, args.spill_bound,
                                           limit)
            status = (f"{compiled.metadata.shared / 1024:.0f} KiB shared, {regs} registers, {spills} B spilled")
            status = f"FAILED: {'; '.join(problems)} ({status})" if problems else f"ok: {status}"
        except Exception as err:  # report every failing variant, not just the first
            problems = [err]
            status = f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        failures += bool(problems)
        print(f"{name}[{label}; {launch}]({types}): {status}", flush=True)
    print(f"{len(variants)} variants compiled for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
