"""Shared helpers of the benchmark suites: every implementation of a case on the same inputs,
in one run, timed and its peak memory measured the same way, reported as ratios to the fused op
(and as GB/s against the device's measured copy bandwidth where bytes are the limit)."""

import math
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import date
from typing import Callable

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, min_time=0.5, max_reps=50):
    """Median seconds per call of ``fn()``.

    On CUDA: ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed between calls).

    Warm-up calls first (at least three and a tenth of ``min_time``: allocator caches, thread
    pools and autotuning settle). Each sample then times a batch of back-to-back calls, as a
    training loop issues them, long enough (>= 1 ms) that the clock and the device sync are noise
    for microsecond ops; the median over samples is reported.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(25, int(100 * min_time)), rep=max(100, int(1000 * min_time)),
                        return_mode="median") / 1e3
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


# --- peak memory -------------------------------------------------------------------------------

def peak_bytes(fn, device) -> int:
    """Bytes above what was allocated before it that one call of ``fn()`` holds at its peak.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: torch's allocations and frees
    as ``torch.profiler`` records them (``profile_memory``), replayed in time order; each op's own
    allocations count from its start, so a temporary it frees before it ends still counts. (A
    process-level figure such as the resident size does not work here: glibc keeps freed
    tensors' pages, and forcing it to return them makes every allocation a system call, which
    would distort the timings taken in the same process.)
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations inside an op are its self_cpu_memory_usage; frees (and allocations outside any
    # op) are "[memory]" events.
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


# --- one case, every implementation -------------------------------------------------------------

@dataclass
class Measured:
    seconds: float  # median per call over the rounds, warm
    rounds: list  # median per call in each round
    first_call: float  # seconds of the first call: compilation for a torch.compile'd function
    peak: int  # bytes, see peak_bytes


def measure(impls: "dict[str, Callable[[], object]]", device, rounds=1, min_time=0.5) -> "dict[str, Measured]":
    """Each implementation's first call, warm median time and peak memory. With ``rounds`` > 1
    the timings alternate between implementations round by round (a shared machine's drifting
    speed then affects all alike) and the median of the rounds is kept."""
    first = {}
    for name, fn in impls.items():
        start = time.perf_counter()
        fn()
        sync(device)
        first[name] = time.perf_counter() - start
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(time_fn(fn, device, min_time=min_time))
    return {name: Measured(statistics.median(times[name]), times[name], first[name], peak_bytes(fn, device))
            for name, fn in impls.items()}


def rows(case: dict, results: "dict[str, Measured]", fused: str = "vdm_fast") -> list:
    """Table rows of one case: time, the fused op's speed-up over each (where it ran), peak
    memory, first call."""
    out = []
    for name, m in results.items():
        row = {**case, "implementation": name, "ms": f"{m.seconds * 1e3:.3f}", "peak MiB": f"{m.peak / 2**20:.1f}",
               "first call s": f"{m.first_call:.2f}"}
        if fused in results:
            row[f"{fused} speed-up"] = f"{m.seconds / results[fused].seconds:.1f}x"
        out.append(row)
    return out


def compiled(fn):
    """``torch.compile`` (inductor, default mode) of ``fn``: the strongest baseline a user gets for
    free. Its first call compiles; ``measure`` reports that time in its own column."""
    return torch.compile(fn, dynamic=False)


def copy_bandwidth(device, nbytes=1 << 28):
    """Measured device-memory copy bandwidth in GB/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds / 1e9


def device_name(device):
    """The card, or the CPU's model (lscpu's "Model name") and the threads torch uses."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


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
