"""Input validation at the op boundary: a bad input raises before any kernel runs, with a
message that names the argument and says what was expected (shared/DESIGN.md section 3)."""

import math

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, floating: bool = False) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")
    return value


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


def per_example(name: str, value, B: int, like_name: str, like: Tensor) -> Tensor:
    """A ``[B]`` floating tensor of per-example values on ``like``'s device."""
    tensor(name, value, floating=True)
    if value.shape != (B,):
        raise ValueError(f"{name} must hold one value per example, shape ({B},), got {tuple(value.shape)}")
    same_device(name, value, like_name, like)
    return value


def finite_number(name: str, value, *, positive: bool = False, integer: bool = False):
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


def images(name: str, x, vocab_size: int) -> Tensor:
    """Integer-valued images in ``[0, vocab_size)``, of an integer or floating dtype."""
    tensor(name, x)
    batch(name, x)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold integer values of an integer or float dtype, got {x.dtype}")
    if x.numel() == 0 or not values_readable(x):
        return x
    lo, hi = (v.item() for v in torch.aminmax(x))  # Python numbers: no uint8 wrap-around
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} must lie in [0, vocab_size) = [0, {vocab_size}), "
                         f"got values in [{lo}, {hi}]")
    if x.is_floating_point() and not torch.equal(x, torch.round(x)):
        raise ValueError(f"{name} must be integer-valued (got a {x.dtype} tensor with fractional values)")
    return x
