"""Tile shapes of the flash-attention kernels (``kernels/attention.py``), and which head dims
they take: plain Python and torch, no triton, so that the fused attention block
(``vdm_fast.ops.attention``) can route without importing Triton (and under ``torch.compile``).

A *kind* is how the products run: ``"half"`` (bfloat16/float16 on the tensor cores),
``"tf32"`` (float32 inputs where torch allows TF32 for float32 matmuls) or ``"ieee"`` (float32
in full precision, on the FMA units: torch's default). Per kind and ``BLOCK_D`` (the head dim
rounded up to a power of two, at least 16) ``VARIANTS`` lists the candidate tile sets and
``DEFAULT`` the one the ops launch; a ``BLOCK_D`` missing from ``DEFAULT`` is a head dim the
kernels cannot hold without spilling (ptxas's report for sm_90, tests/compile_triton.py): the
fused block sends it to ``torch.nn.functional.scaled_dot_product_attention`` instead.

Every variant, default or not, is compiled and checked by tests/compile_triton.py (wgmma for
the tensor-core kinds, spills, shared memory) and timed against SDPA on a card by
benchmarks/bench_attention_tiles.py (benchmarks/gpu_check.sh), which is how a default is
chosen: the defaults below follow the register and shared-memory report and Triton's fused
attention tutorial, not timings.

Each kernel's tiles are ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: ``BLOCK_M`` query rows,
``BLOCK_N`` key rows. The forward and dQ programs hold ``BLOCK_M`` queries and stream keys; the
dK/dV program holds ``BLOCK_N`` keys and streams queries, with its products arranged
transposed (keys as their rows, as the tutorial does) so that every product has ``M >= 64``,
which Hopper's warpgroup MMA (``wgmma``) needs.
"""

from typing import NamedTuple

import torch


class Tiles(NamedTuple):
    fwd: tuple   # (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M queries per program
    dkdv: tuple  # BLOCK_N keys per program, BLOCK_M queries per step
    dq: tuple    # BLOCK_M queries per program, BLOCK_N keys per step
    # dK and dV in two launches (K Q^T computed twice) where both accumulators and K, V do not
    # fit in the registers together (head dim 256).
    split_dkdv: bool = False


KINDS = ("half", "tf32", "ieee")
BLOCK_DS = (16, 32, 64, 128, 256)

VARIANTS = {
    "half": {
        16: {"m128n64": Tiles((128, 64, 4, 3), (32, 128, 4, 3), (128, 32, 4, 3)),
             "m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        32: {"m128n64": Tiles((128, 64, 4, 3), (32, 128, 4, 3), (128, 32, 4, 3)),
             "m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        64: {"m128n64": Tiles((128, 64, 4, 3), (32, 128, 4, 3), (128, 32, 4, 3)),
             "m128n128": Tiles((128, 128, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3)),
             "m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        128: {"m128n64": Tiles((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
              "m128n128": Tiles((128, 128, 8, 3), (64, 128, 8, 1), (128, 64, 8, 3)),
              "m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        256: {"m64n64": Tiles((64, 64, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2), split_dkdv=True),
              "m128n64": Tiles((128, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2), split_dkdv=True)},
    },
    "tf32": {
        16: {"m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        32: {"m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        64: {"m64n64": Tiles((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3))},
        128: {"m64n64": Tiles((64, 64, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2))},
        # 256: every tile set tried spills or overflows shared memory (dQ: 64x16 and 64x32, 1-2
        # stages, 4-8 warps): SDPA.
    },
    "ieee": {
        16: {"m32n32": Tiles((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1))},
        32: {"m32n32": Tiles((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1))},
        64: {"m32n32": Tiles((32, 32, 8, 1), (32, 32, 8, 1), (32, 32, 8, 1))},
        128: {"m32n32": Tiles((32, 32, 8, 1), (32, 32, 8, 1), (32, 32, 8, 1))},
        # dK/dV of 32 keys x 256 in one launch spills registers (tests/compile_triton.py prints
        # each variant's spills): 16 queries a step, in two launches.
        256: {"m32n32": Tiles((32, 32, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2), split_dkdv=True)},
    },
}

# The variant the ops launch per (kind, BLOCK_D); absent: scaled_dot_product_attention.
DEFAULT = {
    "half": {16: "m128n64", 32: "m128n64", 64: "m128n64", 128: "m128n64", 256: "m64n64"},
    "tf32": {16: "m64n64", 32: "m64n64", 64: "m64n64", 128: "m64n64"},
    "ieee": {16: "m32n32", 32: "m32n32", 64: "m32n32", 128: "m32n32", 256: "m32n32"},
}

# Head dims not a multiple of 16 have no divisibility hint: their rows load without vectors or
# asynchronous copies, which costs registers (the 128-row dK/dV tiles spill at d = 40): the
# smaller tiles.
UNALIGNED = {"half": "m64n64", "tf32": "m64n64", "ieee": "m32n32"}


def block_d(d: int) -> int:
    """The head dim rounded up to a power of two, at least 16 (``tl.dot``'s least K)."""
    return max(16, 1 << (int(d) - 1).bit_length())


@torch.compiler.assume_constant_result
def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls use TF32 on CUDA: ``torch.backends.cuda.matmul
    .fp32_precision == "tf32"`` (torch >= 2.9, which ``allow_tf32`` and
    ``torch.set_float32_matmul_precision("high")`` also set), else the legacy
    ``torch.get_float32_matmul_precision() != "highest"``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def kind(dtype: torch.dtype, tf32: bool = None) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    if dtype != torch.float32:
        raise TypeError(f"the attention kernels take float32, bfloat16 or float16, got {dtype}")
    return "tf32" if (tf32_allowed() if tf32 is None else tf32) else "ieee"


def supported(dtype: torch.dtype, d: int, tf32: bool = None) -> bool:
    """Whether the kernels take head dim ``d`` in ``dtype`` (float32: with the float32 matmul
    precision now in force, or ``tf32``); otherwise the fused block runs
    ``scaled_dot_product_attention``."""
    return block_d(d) in DEFAULT[kind(dtype, tf32)]


def choose(dtype: torch.dtype, d: int, variant: str = None, tf32: bool = None):
    """``(kind, tiles)``: the products' kind and the tile set ``variant`` (default:
    ``DEFAULT``'s; ``UNALIGNED``'s for a head dim not a multiple of 16) for head dim ``d``. A
    head dim the fused block sends to SDPA still runs where a tile set holds it: float32 in TF32
    past the TF32 tiles (d > 128) on the full-float32 ones. Past ``BLOCK_D`` 256 nothing does
    (the tiles would not fit in shared memory): ValueError."""
    k, bd = kind(dtype, tf32), block_d(d)
    if bd > max(BLOCK_DS):
        raise ValueError(f"the flash-attention kernels take head dims up to {max(BLOCK_DS)}, got {d}: use "
                         "torch.nn.functional.scaled_dot_product_attention (as vdm_fast.ops.attention_block does)")
    if bd not in VARIANTS[k] and k == "tf32":
        k = "ieee"
    table = VARIANTS[k][bd]
    if variant is None:
        variant = DEFAULT[k].get(bd) if d % 16 == 0 else UNALIGNED[k]
        variant = variant if variant in table else next(iter(table))
    if variant not in table:
        raise KeyError(f"no attention tile variant {variant!r} for {k} at BLOCK_D {bd}; have {sorted(table)}")
    return k, table[variant]
