"""A run folder's bookkeeping: the lock that keeps one trainer per folder, the metrics log, and
the stop that SIGINT/SIGTERM request."""

import fcntl
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from vdm_fast.training.distributed import JobFailed


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder for the life of the process (``flock`` on
    ``<folder>/.lock``): a second trainer on the same folder is refused, and the kernel drops the
    lock when the holder dies, even by ``kill -9``."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RunFolderBusy(f"another process is training in {folder} (it holds {self.path}); "
                                  "stop it first, or choose another --out-dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class MetricsLog:
    """``metrics.jsonl``, one record per logged step. A resumed run first drops the records past
    its checkpoint (written after it by the run that was killed), so every step appears once."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        self.last_time_s = None  # time_s of the last record kept (a resume from an older checkpoint)
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step:
                    kept.append(line + "\n")
                    if isinstance(record.get("time_s"), (int, float)):
                        self.last_time_s = float(record["time_s"])
        self.file = open(path, "w")
        self.file.writelines(kept)
        self.file.flush()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step.

    In a multi-process job (``grace`` seconds given) the stop needs every rank (the ranks agree
    on it in a collective), so it cannot always complete: when it has not ``grace`` seconds
    after the signal (this process or a peer is stuck), ``on_expiry(signum)`` is printed and the
    process ends at once with status 128 + signum, writing nothing. And when the loop leaves
    with a failure, SIGINT/SIGTERM stay ignored rather than reset to their defaults, so that
    the failure is reported and the exit status is the process's own (``Distributed.fail``)."""

    def __init__(self, grace: Optional[float] = None, on_expiry=None):
        self.signum = None
        self._previous = {}
        self._grace, self._on_expiry, self._timer = grace, on_expiry, None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if self._grace is not None and self._timer is None:
            self._timer = threading.Timer(self._grace, self._expire, args=(signum,))
            self._timer.daemon = True
            self._timer.start()

    def _expire(self, signum):
        if self._on_expiry is not None:
            print(self._on_expiry(signum), file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __exit__(self, exc_type, exc, tb):
        if self._timer is not None:
            self._timer.cancel()
        failing = self._grace is not None and exc is not None and not stopped_together(exc)
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if failing else handler)


def stopped_together(err: BaseException) -> bool:
    """Whether ``err`` ends the run on every rank alike without a failure: the stop by a signal
    that all ranks agreed on (``SystemExit(128 + signum)``), or an exit with status 0."""
    return isinstance(err, SystemExit) and not isinstance(err, JobFailed) and (
        err.code is None or isinstance(err.code, int))
