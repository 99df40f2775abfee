"""Input validation at the op boundary: a bad input raises before any kernel runs, with a
message that names the argument and says what was expected (docs/guide/ops.md, "What is checked where").

Shapes, dtypes and devices are checked on every call, traced or not, with tensor attributes
only (no torch op, no device object built where a flag answers), so the checks of a call cost
little on the host (docs/design/backend.md, "Host cost per call"; benchmarks/bench_overhead.py). Checks of the *values*
(images in range, times in [0, 1]) read data, which needs a host sync: they run in eager mode
and are skipped inside ``torch.compile`` and CUDA-graph capture, where the kernels themselves
turn an invalid value into NaN instead (``reconstruction_loss``), so it cannot pass unnoticed."""

import math

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOATS = frozenset(FLOATS)
# Integer dtypes images may come in (unsigned 16/32/64-bit ints have too few torch kernels).
IMAGE_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# The largest vocabulary the kernels take: their per-element sums stay exact up to 2^16 levels.
MAX_VOCAB = 2**16


def tensor(name: str, value, *, floating: bool = False) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no data; pass a CPU or CUDA tensor")
    if floating and value.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")
    return value


def parameters(named, like_name: str, like: Tensor) -> torch.dtype:
    """Floating tensors ``[(name, tensor, shape), ...]`` of the given shapes on ``like``'s device,
    all of one dtype, float64 exactly when ``like`` is (low-precision ``like`` under autocast may
    meet float32 weights); returns that dtype."""
    dtype, device = None, like.device
    for name, value, shape in named:
        if not isinstance(value, Tensor) or value.is_meta or value.dtype not in _FLOATS:
            tensor(name, value, floating=True)  # says which
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
        if value.device != device:
            same_device(name, value, like_name, like)
        if dtype is None:
            dtype, first = value.dtype, name
        elif value.dtype != dtype:
            raise TypeError(f"{name} is {value.dtype} but {first} is {dtype}: the weights must share one dtype")
    if dtype is not None and (dtype == torch.float64) != (like.dtype == torch.float64):
        raise TypeError(f"{like_name} is {like.dtype} but the weights are {dtype}: float64 must be used for both "
                        "or neither")
    return dtype


def positive_int(name: str, value) -> int:
    if type(value) is int and value > 0:  # the common case, without finite_number's keywords
        return value
    return finite_number(name, value, positive=True, integer=True)


def batch(name: str, value: Tensor) -> int:
    """The batch size of a ``[B, ...]`` tensor; refuses scalars and empty batches."""
    if value.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
    if value.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(value.shape)}); B must be >= 1")
    return value.shape[0]


def same_shape(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(value.shape)}")


def same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def per_example(name: str, value, B: int, like_name: str, like: Tensor, *, broadcast: bool = True) -> Tensor:
    """One value per example as a ``[B]`` floating tensor on ``like``'s device.

    With ``broadcast`` (the gamma arguments) anything that broadcasts to one value per example
    is taken, as other code produces it: a Python number, a 0-d or ``[1]`` tensor, ``[B]``, or
    ``[B, 1, ..., 1]``. The result is a view (``reshape``/``expand``), so gradients flow back to
    the original shape and no data is copied. Without it, exactly ``[B]``."""
    if broadcast and isinstance(value, (int, float)) and not isinstance(value, bool):
        finite_number(name, value)
        return torch.full((B,), float(value), dtype=like.dtype if like.is_floating_point() else torch.float32,
                          device=like.device)
    tensor(name, value, floating=True)
    same_device(name, value, like_name, like)
    shape = tuple(value.shape)
    if shape == (B,):
        return value
    if broadcast and all(s == 1 for s in shape[1:]) and (len(shape) == 0 or shape[0] in (1, B)):
        return value.reshape(-1).expand(B)
    accepted = f"({B},), a number, () or (1,), or ({B}, 1, ..., 1)" if broadcast else f"({B},)"
    raise ValueError(f"{name} must hold one value per example, shape {accepted}, got {shape}")


def finite_number(name: str, value, *, positive: bool = False, integer: bool = False):
    kind = type(value)
    if (kind is int or (kind is float and not integer)) and math.isfinite(value) and (value > 0 or not positive):
        return value  # the common case in one test
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def values_readable(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values now: not inside a traced graph (it cannot branch on
    data) nor while a CUDA graph is being captured (reading would synchronise, which capture
    forbids). There the data checks are skipped; the shape and dtype checks always run."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def vocab(name: str, value) -> int:
    positive_int(name, value)
    if not 2 <= value <= MAX_VOCAB:
        raise ValueError(f"{name} must be in [2, {MAX_VOCAB}], got {value}")
    return value


def image_tensor(name: str, x) -> Tensor:
    """A batch of images held in an integer or floating dtype; their values are not read (no host
    sync): ``images`` checks those."""
    tensor(name, x)
    batch(name, x)
    if x.dtype not in IMAGE_INTS + FLOATS:
        raise TypeError(f"{name} must hold integer values as {', '.join(str(d) for d in IMAGE_INTS)} or a float "
                        f"dtype, got {x.dtype} (convert with x.long())")
    return x


def images(name: str, x, vocab_size: int) -> Tensor:
    """Integer-valued images in ``[0, vocab_size)``, of an integer or floating dtype."""
    image_tensor(name, x)
    if x.numel() == 0 or not values_readable(x):
        return x
    lo, hi = (v.item() for v in torch.aminmax(x))  # Python numbers: no uint8 wrap-around
    if not (lo >= 0 and hi < vocab_size):  # written so that NaN fails too
        hint = ""
        if x.is_floating_point() and hi <= 1.0:
            hint = (f"; images held as floats in [0, 1] or [-1, 1] convert with "
                    f"((img + 1) / 2 * {vocab_size - 1}).round() or (img * {vocab_size - 1}).round()")
        raise ValueError(f"{name} must lie in [0, vocab_size) = [0, {vocab_size}), "
                         f"got values in [{lo}, {hi}]{hint}")
    if x.is_floating_point() and not torch.equal(x, torch.round(x)):
        raise ValueError(f"{name} must be integer-valued (got a {x.dtype} tensor with fractional values; "
                         f"images held as floats in [0, 1] convert with (img * {vocab_size - 1}).round())")
    return x
