"""A failure stays on its rank and ends the job (2 gloo processes under torchrun).

Each test runs ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on a small
launcher written to ``tmp_path``: it imports ``vdm_fast.training.train``, wraps ``Run.train_step`` to
inject the fault on one rank at one step (no test hook in the library), wraps
``Run.save_checkpoint`` to keep a copy of every checkpoint the run writes, records the time of
the fault, and calls ``vdm_fast.training.train.main()``. The tests check that torchrun exits non-zero
soon after the fault, that each rank says what happened (with its exit status in torchrun's
summary), and that the checkpoint on disk is the last one written before the fault, byte for
byte, loadable and finite.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdm_fast.io import checkpoint as ckpt

from helpers import TINY

LAUNCHER = r'''
import os, shutil, signal, sys, time
from pathlib import Path

import vdm_fast.training.train as T
from vdm_fast.ops import loss as ops_loss  # the model's bound is composed there (ops.vlb_terms)

FAULT, RANK, STEP = os.environ["FAULT"], int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"])
MARK, COPIES = Path(os.environ["FAULT_MARK"]), Path(os.environ["FAULT_COPIES"])
poisoned = False

real_loss = ops_loss.diffusion_loss


def diffusion_loss(*args, **kwargs):
    loss = real_loss(*args, **kwargs)
    return loss * float("nan") if poisoned else loss


ops_loss.diffusion_loss = diffusion_loss
real_step, real_save = T.Run.train_step, T.Run.save_checkpoint


def train_step(self):
    global poisoned
    if self.job.rank == RANK and self.step == STEP - 1:  # about to compute step STEP (1-based)
        MARK.write_text(repr(time.time()))
        if FAULT == "raise":
            raise RuntimeError(f"injected bad batch at step {STEP}")
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULT == "hang":
            time.sleep(600)
        if FAULT == "nan":
            poisoned = True  # this rank's loss is NaN from here on
        if FAULT == "term":
            os.kill(os.getppid(), signal.SIGTERM)  # the torchrun agent, which signals every rank
    return real_step(self)


def save_checkpoint(self):
    wrote = real_save(self)
    if wrote and self.job.main:
        shutil.copyfile(self.ckpt_path, COPIES / f"{self.step}.pt")
    return wrote


T.Run.train_step, T.Run.save_checkpoint = train_step, save_checkpoint
T.main()
'''

ARGS = [*TINY, "--steps", "8", "--ckpt-every", "2", "--sample-n", "0", "--eval-batches", "1"]
# The raise and the kill end the job through the closed connection, not the collective timeout:
# set it well above the bound, so that a job which waited for it fails the bound.
PROMPT_S, SLOW_TIMEOUT = 20.0, "60"


def torchrun(tmp_path, fault, rank=1, step=3, args=()):
    """Run the launcher under torchrun; returns (process, run folder, seconds from the fault to
    torchrun's exit, {rank: exit status} from torchrun's failure summary)."""
    launcher, out, copies, mark = tmp_path / "launch.py", tmp_path / "run", tmp_path / "copies", tmp_path / "fault"
    launcher.write_text(LAUNCHER)
    copies.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault, "FAULT_RANK": str(rank), "FAULT_STEP": str(step),
           "FAULT_MARK": str(mark), "FAULT_COPIES": str(copies)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(launcher), "--out-dir", str(out), *ARGS, *args],
                          capture_output=True, text=True, timeout=180, cwd="/", env=env)
    ended = time.time()
    assert mark.exists(), f"the fault was never injected:\n{proc.stderr[-3000:]}"
    statuses = {int(r): int(s) for r, s in
                re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", proc.stderr)}
    return proc, out, ended - float(mark.read_text()), statuses


def assert_checkpoint_is(out: Path, step: int):
    """The checkpoint on disk is the one written at ``step``, byte for byte (the launcher's copy),
    no later one was written, and it loads, finite."""
    copies = sorted(int(p.stem) for p in (out.parent / "copies").glob("*.pt"))
    assert copies and copies[-1] == step, f"checkpoints written at steps {copies}, expected the last at {step}"
    assert (out / "checkpoint.pt").read_bytes() == (out.parent / "copies" / f"{step}.pt").read_bytes()
    state = ckpt.load(out / "checkpoint.pt")
    assert state["step"] == step and ckpt.first_non_finite(state) is None
    assert not list(out.glob("checkpoint.pt.*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_raises_ends_the_job_and_the_last_checkpoint_stays(tmp_path, rank):
    proc, out, seconds, statuses = torchrun(tmp_path, "raise", rank=rank, args=["--dist-timeout", SLOW_TIMEOUT])
    other = 1 - rank
    assert proc.returncode != 0
    assert seconds < PROMPT_S, f"{seconds:.1f} s from the fault to the end of the job"
    err = proc.stderr
    assert f"rank {rank} failed at step 3: RuntimeError: injected bad batch at step 3" in err, err[-3000:]
    assert "Traceback" in err  # the failing rank's own traceback, for the bad batch
    assert f"rank {other} stopped at step 3: another rank failed or stopped responding" in err, err[-3000:]
    assert err.count("(step 2), is untouched") == 2
    assert statuses == {0: 1, 1: 1}, err[-2000:]
    assert_checkpoint_is(out, 2)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_stays(tmp_path):
    proc, out, seconds, statuses = torchrun(tmp_path, "kill", args=["--dist-timeout", SLOW_TIMEOUT])
    assert proc.returncode != 0
    assert seconds < PROMPT_S, f"{seconds:.1f} s from the fault to the end of the job"
    err = proc.stderr
    assert "rank 0 stopped at step 3: another rank failed or stopped responding" in err, err[-3000:]
    assert "(step 2), is untouched" in err
    assert statuses == {0: 1, 1: -signal.SIGKILL}, err[-2000:]
    assert_checkpoint_is(out, 2)


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 hangs (alive, in Python) at step 3: rank 0's collective times out after
    --dist-timeout; torchrun's SIGTERM then cannot complete rank 1's stop (the step never ends),
    so rank 1 ends itself --dist-timeout later, before torchrun's 30 s escalation to SIGKILL."""
    timeout = 10
    proc, out, seconds, statuses = torchrun(tmp_path, "hang", args=["--dist-timeout", str(timeout)])
    assert proc.returncode != 0
    assert timeout <= seconds < 2 * timeout + PROMPT_S, f"{seconds:.1f} s from the fault to the end of the job"
    err = proc.stderr
    assert "rank 0 stopped at step 3: another rank failed or stopped responding" in err, err[-3000:]
    assert "Timed out" in err
    assert f"rank 1: SIGTERM at step 3, and the stop has not completed {timeout} s later" in err, err[-3000:]
    assert err.count("(step 2), is untouched") == 2
    assert statuses == {0: 1, 1: 128 + signal.SIGTERM}, err[-2000:]
    assert_checkpoint_is(out, 2)


@pytest.mark.slow
def test_non_finite_steps_on_one_rank_stop_every_rank_at_max_bad_steps(tmp_path):
    """Rank 1's loss is NaN from step 3 on: the all-reduced gradient is NaN on both ranks, both
    skip steps 3 and 4, and both stop at --max-bad-steps 2 with status 1; the step-4 checkpoint
    is never written."""
    proc, out, seconds, statuses = torchrun(tmp_path, "nan",
                                            args=["--max-bad-steps", "2", "--dist-timeout", SLOW_TIMEOUT])
    assert proc.returncode != 0 and seconds < PROMPT_S
    for rank in (0, 1):
        assert f"rank {rank} stopped: error: 2 steps in a row had a non-finite loss" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("(step 2), is untouched") == 2
    assert "another rank failed" not in proc.stderr
    assert statuses == {0: 1, 1: 1}, proc.stderr[-2000:]
    assert_checkpoint_is(out, 2)


@pytest.mark.slow
def test_a_sigterm_to_torchrun_still_checkpoints_every_rank_at_the_same_step(tmp_path):
    """Not a failure: torchrun's agent passes SIGTERM to every rank, they agree on the stop, and
    rank 0 writes the checkpoint of that step (the behaviour before these changes)."""
    proc, out, seconds, _ = torchrun(tmp_path, "term", rank=0, args=["--dist-timeout", SLOW_TIMEOUT])
    assert proc.returncode != 0 and seconds < PROMPT_S
    match = re.search(r"stopped by signal at step (\d+); checkpoint saved to", proc.stderr)
    assert match, proc.stderr[-3000:]
    assert "failed" not in proc.stderr.replace("ChildFailedError", "") and "another rank" not in proc.stderr
    assert_checkpoint_is(out, int(match.group(1)))
