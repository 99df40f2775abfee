"""Shared timing helpers of the benchmark suites: reference and fused on the same inputs, in one
run, reported as a ratio (and as GB/s against the device's measured copy bandwidth)."""

import math
import platform
import statistics
import time
from datetime import date

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, min_time=0.5, max_reps=50):
    """Median seconds per call of ``fn()``.

    Warm-up calls first (at least three and a tenth of ``min_time``: allocator caches, thread
    pools and autotuning settle). Each sample then times a batch of back-to-back calls, as a
    training loop issues them, long enough (>= 1 ms) that the clock and the device sync are noise
    for microsecond ops; the median over samples is reported.
    """
    start = time.perf_counter()
    warmups = 0
    while warmups < 3 or time.perf_counter() - start < 0.1 * min_time:
        fn()
        warmups += 1
    sync(device)
    per_call = (time.perf_counter() - start) / warmups
    batch = max(1, math.ceil(1e-3 / per_call))
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def time_interleaved(fns: dict, device, rounds=5, min_time=0.2):
    """``{name: median seconds per call}`` over ``rounds`` rounds that time each function in turn:
    on a shared machine whose speed drifts, every function sees the same conditions."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, min_time=min_time))
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(device, nbytes=1 << 28):
    """Measured device-memory copy bandwidth in GB/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds / 1e9


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def header(title, device):
    import vdm_fast

    info = vdm_fast.build_info()
    return (f"## {title}\n\n{date.today()} · {device_name(device)} · torch {torch.__version__} · "
            f"vdm_fast {vdm_fast.__version__} (extension: {info.get('extension')}, cuda: {info.get('cuda')})"
            f" · copy bandwidth {copy_bandwidth(device):.1f} GB/s\n")


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
