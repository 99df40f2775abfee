"""Compile every Triton kernel variant the ops launch for a CUDA card, on a machine without one.

The kernels' launch wrappers (``vdm_fast.kernels.*``) run on CPU tensors with every kernel's
launch replaced by a recorder. Each distinct (kernel, argument types, constexprs) recorded is
then compiled to a cubin with ``triton.compile`` for the target architecture. This is what the
interpreter cannot check: code generation for the card, including tensor-core dots, reductions,
layouts and ptxas register allocation. It does not check numbers; the CUDA parity tests do that
on a card.

    python tests/compile_triton.py [--arch 90]    (with TRITON_INTERPRET unset)

Run by tests/test_build.py in a subprocess, because the test session imports triton under the
interpreter.
"""

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton.py compiles for a card: run it with TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vdm_fast.kernels import attention, loss, norm, schedule  # noqa: E402

# Shared memory one block may use (the opt-in maximum), per compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def specialise(kernel, args, kwargs):
    """``(signature, constexprs, options)`` of one recorded launch: what ``ASTSource`` and
    ``triton.compile`` take (options: launch settings such as ``num_warps``)."""
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound.pop(param.name)
        signature[param.name] = "constexpr" if param.is_constexpr else arg_type(value)
        if param.is_constexpr:
            constexprs[param.name] = value
    return signature, constexprs, bound


def ptxas_usage(ptx: str, arch: int) -> str:
    """Registers and spill bytes per thread, from the bundled ptxas's report (a performance
    hint for tuning on a card; empty where ptxas cannot be found)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except Exception:  # a Triton without the NVIDIA backend's tools: no hint
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                                 path, "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return f", {regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled"


def launch_all():
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
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (32, 64, 128, 256):  # head dims 32..256: every BLOCK_D
            q = torch.randn(2, 40, d, dtype=dtype)
            attention.flash_attention_forward(q, q, q, d ** -0.5)
            attention.flash_attention_backward(q, q, q, q, q, torch.zeros(2, 40), d ** -0.5)
        w, b = torch.randn(128), torch.randn(128)
        for layout in (torch.contiguous_format, torch.channels_last):
            for size, groups in ((32, 32), (8, 8)):  # 4 and 16 channels per group
                x = torch.randn(B, 128, size, size, dtype=dtype).contiguous(memory_format=layout)
                for cond in (None, torch.randn(B, 128, dtype=dtype)):
                    for silu in (True, False):
                        norm.group_norm_silu_forward(x, w, b, cond, groups, 1e-6, silu)
                        norm.group_norm_silu_backward(x, x, w, b, cond, torch.zeros(B, groups),
                                                      torch.ones(B, groups), groups, silu)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80")
    args = parser.parse_args()
    calls, launched = [], []
    for module in (attention, loss, norm, schedule):
        text = inspect.getsource(module)
        for name, value in vars(module).copy().items():
            # The launched kernels (``name[grid](...)`` in the module), not the jit helpers they call.
            if isinstance(value, triton.runtime.jit.JITFunction) and re.search(rf"(?<!\w){name}\[", text):
                launched.append((module, name, value))
                setattr(module, name, Recorder(value, calls))
    launch_all()
    for module, name, value in launched:
        setattr(module, name, value)
    never = {name for _, name, value in launched} - {kernel.__name__ for kernel, _, _ in calls}
    if never:
        print(f"kernels launch_all() never launched: {sorted(never)}")
        return 1
    variants = {}
    for kernel, call_args, call_kwargs in calls:
        signature, constexprs, options = specialise(kernel, call_args, call_kwargs)
        key = (kernel.__name__, tuple(signature.items()),
               tuple((k, str(v)) for k, v in {**constexprs, **options}.items()))
        variants.setdefault(key, (kernel, signature, constexprs, options))
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    failures = 0
    for (name, signature, constexprs), (kernel, sig, consts, options) in variants.items():
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                                      options=options)
            shared = compiled.metadata.shared
            status = f"ok: {shared / 1024:.0f} KiB shared{ptxas_usage(compiled.asm['ptx'], args.arch)}"
            if shared > limit:  # the launch would fail with OutOfResources on the card
                failures += 1
                status = f"FAILED: {shared} B of shared memory, over sm_{args.arch}'s {limit}"
        except Exception as err:  # report every failing variant, not just the first
            failures += 1
            status = f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        types = ", ".join(v for k, v in signature if v != "constexpr")
        print(f"{name}[{', '.join(f'{k}={v}' for k, v in constexprs)}]({types}): {status}", flush=True)
    print(f"{len(variants)} variants compiled for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
