"""This process's place in a ``torchrun`` job (or a job of one), for the trainer and the
evaluator alike: the collectives they need, each bounded by a timeout, and the rule that a
failure stays on its rank and ends the job."""

import datetime
import os
import re
import signal
import sys
import traceback

import torch
import torch.distributed as dist


class JobFailed(SystemExit):
    """A process of a multi-process job failed, or lost a peer: its message is printed, and the
    process must exit (status ``code``) without another collective. ``__cause__`` is the error."""


class SharedStop(RuntimeError):
    """A stop that every rank decides at the same point from all-reduced values (the trainer's
    non-finite loss): reported as a stop with its message, not as one rank's failure."""


def _collective_failed(err: BaseException) -> bool:
    """Whether ``err`` came out of a collective whose peers are gone or stuck (gloo raises a
    plain RuntimeError naming its source file: "Connection closed by peer", "Timed out")."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and re.search(r"gloo|nccl|connection (closed|reset)|timed out",
                                                    str(err), re.IGNORECASE) is not None)


class Distributed:
    """This process's place in a torchrun job (or a job of one).

    A failure stays on its rank and ends the job: every collective waits at most ``timeout``
    seconds (then raises); a rank that fails says so and exits without another collective; a
    rank whose collective raises (a peer died, failed, or is stuck) says so and exits too.

    ``device_kind`` picks the backend, NCCL for ``"cuda"`` and gloo otherwise; the collectives
    take and return CPU tensors and move them to the backend's device (NCCL reduces only CUDA
    tensors). A caller that has already initialised the default process group keeps it: it is
    used as it is and left open."""

    def __init__(self, device_kind: str, timeout: float = 600.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout = timeout
        self.failed = False
        self._owner = False
        # Where this process is and what is on disk, for the failure messages (set by the caller).
        self.at = "during start-up"
        self.last_good = lambda: "No checkpoint was written by this run."
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
            self._owner = True

    @classmethod
    def alone(cls) -> "Distributed":
        """A job of this process only, whatever torchrun says: rank 0 of 1, no collectives (the
        trainer's final report, which only its main process computes)."""
        job = cls.__new__(cls)
        job.world, job.rank, job.local_rank, job.timeout, job.failed, job._owner = 1, 0, 0, 0.0, False, False
        job.at, job.last_good = "", lambda: ""
        return job

    def fail(self, err: BaseException) -> None:
        """Report this process's failure (one line on stderr, after the traceback of an
        unexpected error); from here on SIGINT/SIGTERM are ignored (torchrun's SIGTERM to the
        survivors must not cut the message or turn the exit status into -15) and ``close``
        attempts no collective."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.failed = True
        who = f"rank {self.rank}"
        if isinstance(err, SharedStop):  # every rank takes this decision at the same step (named)
            line = f"{who} stopped: error: {err}"
        elif isinstance(err, SystemExit):  # a one-line error of this rank ("error: ...")
            line = f"{who} failed {self.at}: {err.code}"
        elif _collective_failed(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            line = (f"{who} stopped {self.at}: another rank failed or stopped responding (a collective raised "
                    f"{type(err).__name__}: {first}); see that rank's message. {self.last_good()}")
        else:
            traceback.print_exception(type(err), err, err.__traceback__)
            line = f"{who} failed {self.at}: {type(err).__name__}: {err}. {self.last_good()}"
        print(line, file=sys.stderr, flush=True)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """``t`` (any device) reduced over the processes, as a new CPU tensor."""
        if self.world == 1:
            return t.detach().cpu().clone()
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.detach().to(on, copy=True).contiguous()
        dist.all_reduce(t, op=op)
        return t.cpu()

    def all_min(self, value: float) -> float:
        return self._all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MIN).item()

    def max(self, value: float) -> float:
        return self._all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MAX).item()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (per-image results, zero where another process holds
        them, come back with each entry as its one process computed it)."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world

    def average_gradients(self, params) -> None:
        """All-reduce the gradients that were set outside DDP's backward (on their device)."""
        if self.world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        # After a failure the group is broken: tearing it down could wait on a dead peer.
        if self._owner and not self.failed:
            dist.destroy_process_group()
            self._owner = False
