"""Train a VDM and report its test-set likelihood: ``python -m vdm_fast.training.train [flags]``.

With no flags it trains the small default model on scikit-learn's bundled digits on the CPU
(minutes on 2 cores) and prints the test bits per dim beside the per-pixel histogram baseline.
``torchrun --nproc_per_node N -m vdm_fast.training.train ...`` runs data-parallel (NCCL on GPUs, gloo on
CPUs), with the same results as one process at the same global batch.

Reproducibility: the data order, the times and noises of the bound, the label dropout and
the dropout masks are all functions of ``(seed, step, the example's index in the global
batch)``, never of a running RNG, so a run resumed from a checkpoint continues exactly as if it
had never stopped, and N processes compute what one process with the global batch computes.

Safety: one trainer per run folder (a lock), a checkpoint is never written with non-finite
weights (a run whose update made them non-finite stops at once, exit status 1), and the last
good checkpoint is never replaced by a worse one.

Execution: ``--compile`` runs the model through ``torch.compile``; ``--cuda-graphs`` (CUDA) replays
the whole step as one CUDA graph. Both compute what the eager step computes (up to float
rounding), with the same checkpoints and guards; a machine that cannot run them is refused
before anything is written.
"""

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from vdm_fast.extras import require

require("train")  # a one-line message, not an ImportError, without the extra

from tqdm import tqdm

from vdm_fast import backend
from vdm_fast.io import checkpoint as ckpt
from vdm_fast.io.atomic import remove_stale_temporaries
from vdm_fast.training import data as datasets
from vdm_fast.config import TrainConfig, parse_args, to_dict
from vdm_fast.training.curves import RunPlots
from vdm_fast.training.distributed import Distributed, JobFailed, SharedStop
from vdm_fast.training.evaluate import BOUND_DRAWS, evaluate
from vdm_fast.training.optim import learning_rate, make_optimizer
from vdm_fast.training.run import MetricsLog, RunFolderBusy, RunLock, StopRequest, stopped_together
from vdm_fast.factory import build_model
from vdm_fast.nn.dropout import global_masks
from vdm_fast.diffusion import draws
from vdm_fast.training.images import save_grid
from vdm_fast.seeds import mix


class NonFiniteLoss(SharedStop):
    """Too many steps in a row had a non-finite loss or gradient, or an update made the weights
    non-finite."""


class BatchSampler:
    """Global batches drawn without replacement from a permutation per epoch, seeded by
    ``(seed, epoch)``; each process takes its contiguous slice of every global batch."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int):
        if global_batch % world:
            raise ValueError(f"batch_size ({global_batch}) must be divisible by the number of processes ({world})")
        if global_batch > n:
            raise ValueError(f"batch_size ({global_batch}) is larger than the training set ({n} images)")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.local = global_batch // world
        self.rank = rank
        self.per_epoch = n // global_batch
        self._epoch, self._perm = None, None

    def position(self, step: int):
        """``(epoch, batch within the epoch)`` of a step: the data position of a checkpoint."""
        return divmod(step, self.per_epoch)

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = self.position(step)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        start = pos * self.global_batch + self.rank * self.local
        return self._perm[start:start + self.local]


def _device_kind(cfg: TrainConfig) -> str:
    return cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if _device_kind(cfg) == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _check_execution(cfg: TrainConfig) -> None:
    """Refuse, before anything is written or trained, what this machine cannot run: --cuda-graphs
    without a CUDA device, --compile without a torch.compile that works here (tried on a two-op
    function: a missing C++ compiler or Triton shows there, not half-way through a run)."""
    kind = _device_kind(cfg)
    if cfg.cuda_graphs and kind != "cuda":
        raise SystemExit("error: --cuda-graphs captures CUDA work, and no CUDA GPU is available: this run would "
                         "train on the CPU (leave --cuda-graphs out)")
    if cfg.compile:
        try:
            torch.compile(lambda v: v * 2.0 + 1.0, fullgraph=True)(torch.ones(4, device=kind))
        except Exception as err:  # whatever the backend raises: the message is what the user needs
            reason = (str(err).strip().splitlines() or [""])[0]
            raise SystemExit(f"error: --compile needs a working torch.compile on {kind}, and it failed on a two-op "
                             f"function ({type(err).__name__}: {reason}); leave --compile out") from None


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns the final metrics.

    In a multi-process job, a failure of this process or of a peer prints one line naming the
    rank, the step and the error (and that the last good checkpoint is untouched), then raises
    ``JobFailed`` (status 1, the error as its cause); a stop by a signal that every rank agreed
    on raises ``SystemExit(128 + signum)`` as in a single process."""
    _check_execution(cfg)
    job = Distributed(_device_kind(cfg), float(cfg.dist_timeout))
    lock = None
    try:
        lock = _open_run_folder(cfg, job)
        # --ops reference switches every op for this run; "auto" keeps the process's choice
        # (VDM_FAST_BACKEND).
        with backend.use("reference") if cfg.ops == "reference" else contextlib.nullcontext():
            return _train(cfg, job)
    except BaseException as err:
        if job.world == 1 or stopped_together(err):
            raise
        job.fail(err)
        raise JobFailed(1) from err
    finally:
        if lock is not None:
            lock.release()
        job.close()


def _open_run_folder(cfg: TrainConfig, job: Distributed):
    """Lock the run folder (main process), clear what a killed run left, and refuse to start
    afresh over a checkpoint. Returns the lock (None on other ranks)."""
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    lock = None
    if job.main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(out)
        except RunFolderBusy as err:
            raise SystemExit(f"error: {err}")
        for name in remove_stale_temporaries(ckpt_path):
            print(f"removed {out / name}, left by a run killed while writing its checkpoint", file=sys.stderr)
        if ckpt_path.exists() and not cfg.resume:
            lock.release()  # train() releases it, but it has not been handed over yet
            raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue that run, "
                             "or choose another --out-dir (nothing was overwritten)")
    job.barrier()
    return lock


def _restore(cfg, ckpt_path, model, ema, optimizer, shape, vocab_size):
    """Load a checkpoint into the model, EMA and optimiser; returns (step, skipped steps, its
    ``time_s``: None in a checkpoint written before the trainer recorded it)."""
    try:
        state = ckpt.load(ckpt_path)
        ckpt.verify_compatible(state, cfg, ckpt_path, shape, vocab_size)
        ckpt.load_weights(model, state["model"], ckpt_path, "model")
        params = dict(model.named_parameters())
        ckpt.verify_weights(params, state["ema"], ckpt_path, "EMA")
        for name, e in zip(params, ema):
            e.copy_(state["ema"][name])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_path}: its optimiser state does not fit this model ({err})")
    except ckpt.CheckpointError as err:
        raise SystemExit(f"error: cannot resume: {err}")
    time_s = state.get("time_s")
    return state["step"], state["skipped_steps"], float(time_s) if isinstance(time_s, (int, float)) else None


# Eager steps before --cuda-graphs captures one: lazy initialisations (cuBLAS, the optimiser's
# state, torch.compile's compilation) happen outside the capture, as CUDA graphs require.
_WARMUP_STEPS = 3


def _capture_obstacle(cfg: TrainConfig, job: Distributed) -> Optional[str]:
    """Why this run's step cannot be one CUDA graph (None: it can be tried)."""
    if job.world > 1:
        return "a torchrun job's gradient all-reduce (DDP) is not captured"
    if cfg.dropout > 0:
        return (f"dropout ({cfg.dropout:g}) draws its masks from generators seeded per step, which a replayed graph "
                "cannot reseed")
    return None


def _step_options(optimizer: torch.optim.Optimizer, captured: bool, device: torch.device) -> None:
    """The optimiser's per-group options this run steps with, whatever a resumed checkpoint
    recorded: under --cuda-graphs the learning rate lives in a device tensor (the captured graph
    reads it; each step writes it in place) and the state is capturable; otherwise a float."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if captured else lr
        group["capturable"] = captured


def _plain_options(optimizer_state: dict) -> dict:
    """An optimiser state to save: learning rates as floats (a --cuda-graphs run holds them in
    device tensors; a resumed run puts them back as it steps, _step_options)."""
    for group in optimizer_state["param_groups"]:
        group["lr"] = float(group["lr"])
    return optimizer_state


class Run:
    """One process's training state: the model, its EMA and optimiser, the step counters, and
    what has been saved. The loop in ``_train`` drives it; ``Run(cfg, job).train_step()`` is one
    step of the driver's own, which the benchmarks (``benchmarks/bench_step.py``) and tests time
    and check."""

    def __init__(self, cfg: TrainConfig, job: Distributed):
        self.cfg, self.job = cfg, job
        # Wall time: time_s = the resumed checkpoint's time_s + the seconds since this start.
        self.clock, self.time_base = time.perf_counter(), None
        self.device = _device(cfg, job.local_rank)
        self.ckpt_path = Path(cfg.out_dir) / "checkpoint.pt"
        try:
            self.ds = datasets.load(cfg.data, cfg.data_dir)
        except datasets.DataError as err:
            raise SystemExit(f"error: {err}")
        self.shape = self.ds.image_shape
        torch.manual_seed(cfg.seed)
        try:
            model = build_model(cfg, self.shape, self.ds.vocab_size, self.ds.num_classes).to(self.device)
        except ValueError as err:
            raise SystemExit(f"error: {err}")
        bf16 = cfg.bf16 and backend.native_bf16(self.device)
        # channels_last where the convolutions run in NHWC (cuDNN; oneDNN in bf16): an NCHW
        # tensor would be reordered at every convolution (benchmarks/RESULTS.md, "GroupNorm(+SiLU)").
        if self.device.type == "cuda" or bf16:
            model = model.to(memory_format=torch.channels_last)
        if bf16:
            model.autocast_dtype = torch.bfloat16  # the score network only
        self.model, self.params = model, list(model.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = make_optimizer(model, cfg)
        self.step, self.skipped, self.bad_in_row = 0, 0, 0
        if cfg.resume:
            self.step, self.skipped, self.time_base = _restore(cfg, self.ckpt_path, model, self.ema, self.optimizer,
                                                               self.shape, self.ds.vocab_size)
            if job.main:
                print(f"resumed {self.ckpt_path} at step {self.step}", file=sys.stderr)
        self.last_saved = self.step if cfg.resume else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(model) if job.world > 1 else model
        self.sampler = BatchSampler(len(self.ds.train.images), cfg.batch_size, cfg.seed, job.rank, job.world)
        # --compile: the forward through torch.compile, one graph where nothing needs a break
        # (dropout's per-call generators, the variance objective's retained gradients and DDP's
        # buckets do); the backward is compiled with it. The first step reports its time.
        self.forward = self.ddp
        if cfg.compile:
            whole = job.world == 1 and cfg.dropout == 0 and cfg.schedule_objective == "elbo"
            self.forward = torch.compile(self.ddp, fullgraph=whole)
        self.first_step_timed = not cfg.compile
        # --cuda-graphs: the step is captured after _WARMUP_STEPS eager steps and replayed.
        obstacle = _capture_obstacle(cfg, job) if cfg.cuda_graphs else None
        if obstacle and job.main:
            print(f"--cuda-graphs: {obstacle}; every step runs eagerly", file=sys.stderr)
        self.capture_at = self.step + _WARMUP_STEPS if cfg.cuda_graphs and not obstacle else None
        _step_options(self.optimizer, self.capture_at is not None, self.device)
        self.graph = None  # (CUDAGraph, static inputs, static results) once captured

    def elapsed(self) -> float:
        """``time_s``: seconds since the run first started, continued from the checkpoint's value
        on a resume (the time between a stop and its resume does not count)."""
        return (self.time_base or 0.0) + time.perf_counter() - self.clock

    def state_dict(self) -> dict:
        names = [n for n, _ in self.model.named_parameters()]
        return {
            "config": to_dict(self.cfg), "step": self.step, "skipped_steps": self.skipped, "time_s": self.elapsed(),
            "model": self.model.state_dict(), "ema": dict(zip(names, self.ema)),
            "optimizer": _plain_options(self.optimizer.state_dict()), "image_shape": list(self.shape),
            "vocab_size": self.ds.vocab_size, "num_classes": self.model.num_classes,
            "data_position": dict(zip(("epoch", "batch"), self.sampler.position(self.step))),
            # Every random draw is a function of (seed, step, global index): the whole RNG state.
            "rng": {"seed": self.cfg.seed, "derived_from": "seed, step, global example index"},
        }

    def last_good(self) -> str:
        if self.last_saved is None:
            return "No checkpoint was written."
        return f"The last good checkpoint, {self.ckpt_path} (step {self.last_saved}), is untouched."

    def save_checkpoint(self) -> bool:
        """Write the checkpoint, unless the last step was non-finite: weights that just produced
        a NaN loss are suspect (an update can make them huge but finite), so the save waits for
        the next good step. Returns whether it wrote."""
        if self.bad_in_row:
            return False
        if self.job.main:
            try:
                ckpt.save(self.ckpt_path, self.state_dict())
            except ckpt.CheckpointError as err:  # non-finite optimiser state: never written
                raise NonFiniteLoss(f"{err} at step {self.step}; stopping. {self.last_good()}") from None
        self.last_saved = self.step
        return True

    def train_step(self):
        """One optimiser step (skipped when non-finite); returns the forward's ``VDMOutput``,
        the objective per example and the gradient norm."""
        start, cfg, step = time.perf_counter(), self.cfg, self.step
        lr = learning_rate(cfg, step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # on the device: a captured step reads it there
            else:
                group["lr"] = lr
        inputs = self.step_inputs(step)
        result = self._replay(inputs) if self.capture_at is not None and step >= self.capture_at else None
        if result is None:
            result = self._step(inputs)
        out, objective, grad_norm, weights_finite = result
        grad_norm = grad_norm.item()  # the step's one host read
        if math.isfinite(grad_norm):
            # A finite gradient can still make non-finite weights (a learning rate of 1e6):
            # nothing can recover from that, so stop before anything is written.
            if not weights_finite.item():
                raise NonFiniteLoss(f"the update of step {step + 1} made the weights non-finite "
                                    f"(learning rate {cfg.lr:g} too high?); stopping. {self.last_good()}")
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
            if self.bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteLoss(f"{self.bad_in_row} steps in a row had a non-finite loss or gradient "
                                    f"(step {step}); stopping. {self.last_good()}")
        self.step += 1
        if not self.first_step_timed:
            self.first_step_timed = True
            if self.job.main:
                print(f"--compile: the first step took {time.perf_counter() - start:.1f} s, compilation included",
                      file=sys.stderr)
        return out, objective, grad_norm

    def step_inputs(self, step: int) -> dict:
        """The batch and its draws on the device (functions of (seed, step, global index)), and
        the step itself (the dropout masks' seed)."""
        cfg, device, conditional = self.cfg, self.device, bool(self.model.num_classes)
        idx = self.sampler.indices(step)
        rows = slice(self.job.rank * self.sampler.local, (self.job.rank + 1) * self.sampler.local)
        t, eps, eps_0, drop_labels = draws.step_draws(cfg.seed, step, cfg.batch_size, self.shape,
                                                      antithetic=cfg.antithetic, label_dropout=cfg.label_dropout,
                                                      rows=rows)
        return {"x": self.ds.train.images[idx].to(device), "t": t.to(device), "eps": eps.to(device),
                "eps_0": eps_0.to(device), "labels": self.ds.train.labels[idx].to(device) if conditional else None,
                "drop_labels": drop_labels.to(device) if conditional else None, "step": step, "rows": rows}

    def _step(self, inputs: dict):
        """Forward, backward, clipping, AdamW and EMA, with no host read, so that a CUDA graph can
        capture it: a non-finite gradient skips the update on the device (the fused AdamW reads
        ``found_inf`` and leaves the weights and its state as they were; the EMA's weight is
        zero). Returns the output, the objective, the gradient norm and whether the weights are
        all finite, the last two as tensors."""
        cfg, model = self.cfg, self.model
        # Forward (through DDP, which all-reduces the gradients in the backward).
        with global_masks(draws.dropout_seed(cfg.seed, inputs["step"]), inputs["rows"].start, cfg.batch_size):
            out = self.forward(inputs["x"], T=cfg.T, t=inputs["t"], eps=inputs["eps"], eps_0=inputs["eps_0"],
                               labels=inputs["labels"], drop_labels=inputs["drop_labels"])
        objective = model.objective(out)
        # Backward; the variance objective then replaces the schedule network's gradients with
        # those of the variance (set outside DDP's backward, so averaged over the processes here).
        self.optimizer.zero_grad(set_to_none=True)
        objective.mean().backward()
        if cfg.schedule_objective == "variance":
            self.job.average_gradients(model.variance_step_(out))
        # Clip. A non-finite loss anywhere makes the all-reduced gradient non-finite everywhere,
        # so every process takes the same decision from its gradient norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        finite = torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        with torch.no_grad():  # ema += w (p - ema), w = 1 - decay, or 0 after a skipped step
            delta = torch._foreach_sub([p.detach() for p in self.params], self.ema)
            torch._foreach_mul_(delta, finite.to(self.ema[0].dtype) * (1.0 - cfg.ema))
            torch._foreach_add_(self.ema, delta)
        weights_finite = torch.stack(torch._foreach_norm(self.params, math.inf)).isfinite().all()
        return out, objective, grad_norm, weights_finite

    def _replay(self, inputs: dict):
        """--cuda-graphs: the step as the captured graph, captured at its first call; None where
        it cannot be (the run then says why once, and every later step runs eagerly)."""
        if self.graph is None:
            static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    result = self._step(static)
            except RuntimeError as err:  # a host read or an uncapturable op inside the step
                return self._eager_from_now(f"step {self.step + 1} could not be captured "
                                            f"({(str(err).strip().splitlines() or [''])[0]})")
            self.graph = graph, static, result
        graph, static, result = self.graph
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                if value.shape != static[name].shape:
                    return self._eager_from_now(f"step {self.step + 1}'s {name} has shape {tuple(value.shape)}, the "
                                                f"captured step's {tuple(static[name].shape)}")
                static[name].copy_(value)
            else:
                static[name] = value
        graph.replay()
        return result

    def _eager_from_now(self, reason: str):
        if self.job.main:
            print(f"--cuda-graphs: {reason}; this and every later step run eagerly", file=sys.stderr)
        torch.cuda.synchronize(self.device)
        self.capture_at, self.graph = None, None
        return None

    def record(self, out, objective, grad_norm: float, images_per_s: float) -> dict:
        names = ("bpd", "objective", "reconstruction", "prior", "diffusion")
        per_example = (out.bpd, objective, out.reconstruction, out.prior, out.diffusion)
        values = self.job.mean(torch.stack([v.detach().float().mean() for v in per_example]).cpu())
        return {"step": self.step, "time_s": round(self.elapsed(), 3),
                **{name: v.item() for name, v in zip(names, values)},
                "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": grad_norm, "images_per_s": images_per_s,
                "skipped_steps": self.skipped}


def _train(cfg: TrainConfig, job: Distributed) -> dict:
    if cfg.tensorboard:
        require("tensorboard")  # every rank, before any work: one line naming the extra
    run = Run(cfg, job)
    out = Path(cfg.out_dir)
    if job.main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    metrics = MetricsLog(out / "metrics.jsonl", run.step if cfg.resume else None) if job.main else None
    if metrics is not None and cfg.resume and run.time_base is None:  # a checkpoint older than time_s
        run.time_base = metrics.last_time_s
    # curves.png and TensorBoard: the main process only.
    plots = RunPlots(out, cfg.tensorboard, run.step if cfg.resume else None) if job.main else None
    window_start, window_images = time.perf_counter(), 0
    due = False  # a checkpoint is owed (deferred while steps are non-finite)
    run.ddp.train()
    job.last_good = run.last_good

    def stuck(signum):
        return (f"rank {job.rank}: {signal.Signals(signum).name} {job.at}, and the stop has not completed "
                f"{job.timeout:g} s later (another rank failed or stopped responding, or this one is stuck); "
                f"exiting with status {128 + signum} without a checkpoint. {run.last_good()}")

    with StopRequest(job.timeout if job.world > 1 else None, stuck) as stop, \
            tqdm(total=cfg.steps, initial=run.step, desc="train", disable=not job.main, dynamic_ncols=True) as bar:
        while run.step < cfg.steps:
            job.at = f"at step {run.step + 1}"
            terms, objective, grad_norm = run.train_step()
            window_images += cfg.batch_size
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                record = run.record(terms, objective, grad_norm, window_images / (time.perf_counter() - window_start))
                window_start, window_images = time.perf_counter(), 0
                if job.main:
                    bar.set_postfix(bpd=f"{record['bpd']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                    metrics.write(record)
                    plots.log(record)
            stop_now = job.all_min(0.0 if stop.signum else 1.0) == 0.0
            due = due or run.step % cfg.ckpt_every == 0 or run.step == cfg.steps or stop_now
            if due and run.save_checkpoint():
                due = False
                if plots is not None and run.step < cfg.steps:  # the end's plot follows the final report
                    plots.checkpoint(run.model, run.ema, run.step)
            if stop_now:
                bar.close()
                if job.main:
                    saved = f"checkpoint saved to {run.ckpt_path}" if not due else run.last_good()
                    print(f"\nstopped by signal at step {run.step}; {saved}. Continue with --resume.", file=sys.stderr)
                    plots.close()
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    if due and job.main:
        print(f"warning: the last step was non-finite, so the final state was not saved. {run.last_good()}",
              file=sys.stderr)
    if metrics:
        metrics.close()
    job.at = f"after step {run.step}"
    # The last collective: the other ranks need not wait (under the collective timeout) for the
    # main process's evaluation and samples, which take as long as they take.
    job.barrier()

    result = {"step": run.step, "skipped_steps": run.skipped}
    if job.main:
        result.update(_final_report(cfg, run.model, run.ema, run.ds, run.device, out, step=run.step))
        curves = plots.final(run.model, result)  # the model now holds the EMA weights
        plots.close()
        if curves is not None:
            print(_report_line("learning curves:", f"{curves}  (vdm-fast curves RUN_DIR redraws them)"))
        if cfg.tensorboard:
            print(_report_line("tensorboard:", f"tensorboard --logdir {out / 'tensorboard'}"))
    return result


def _report_line(label: str, text: str) -> str:
    """A line of the final report: the labels in one column, wide enough for the longest."""
    return f"{label:<41}{text}"


def _final_report(cfg, model, ema, ds, device, out: Path, step: Optional[int] = None) -> dict:
    """Test bpd with the EMA weights beside the histogram baseline, and a sample grid;
    ``result.json`` also records the ``step`` they were taken at."""
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    model.autocast_dtype = None  # in float32, as the evaluate command loads the checkpoint
    def bpd(T):  # the evaluate command's default figure
        return evaluate(model, ds.test.images, ds.test.labels if model.num_classes else None, T=T,
                        draws=BOUND_DRAWS, batch_size=cfg.batch_size, max_batches=cfg.eval_batches, seed=cfg.seed, device=device,
                        progress=True)

    bound = bpd(0)
    report = {"test_bpd": bound["bpd"], "test_bpd_se": bound["se"],
              "histogram_bpd": datasets.histogram_bpd(ds.train.images, ds.test.images, ds.vocab_size)}
    lines = [_report_line("test bpd (continuous time, EMA weights):",
                          f"{bound['bpd']:.4f} +- {bound['se']:.4f} (standard error over {bound['images']} images, "
                          f"{bound['draws']} draws each)")]
    if cfg.eval_T:
        stepped = bpd(cfg.eval_T)
        report.update({f"test_bpd_T{cfg.eval_T}": stepped["bpd"], f"test_bpd_T{cfg.eval_T}_se": stepped["se"]})
        lines.append(_report_line(f"test bpd (T={cfg.eval_T}):", f"{stepped['bpd']:.4f} +- {stepped['se']:.4f}"))
    lines.append(_report_line("per-pixel histogram baseline:", f"{report['histogram_bpd']:.4f}"))
    if cfg.sample_n:
        model.eval()
        labels = torch.arange(cfg.sample_n, device=device) % model.num_classes if model.num_classes else None
        images = model.sample(cfg.sample_n, cfg.sample_T, generator=torch.Generator(device).manual_seed(cfg.seed),
                              labels=labels, guidance=cfg.guidance)
        save_grid(images, ds.vocab_size, out / "samples.png", scale=max(1, 128 // ds.image_shape[-1]))
        lines.append(_report_line(f"samples (T={cfg.sample_T}):",
                                  f"{out / 'samples.png'}  (--sample-T; vdm-fast sample defaults to T=1000)"))
    (out / "result.json").write_text(json.dumps(report if step is None else {"step": step, **report}, indent=2) + "\n")
    print("\n".join(lines))
    return report


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    try:
        cfg = parse_args(argv, prog=prog or "python -m vdm_fast.training.train")
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    try:
        train(cfg)
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}")
    except JobFailed as err:
        # A multi-process job failed here or on a peer, and this process has said so: exit now,
        # without the interpreter's teardown of the broken process group (which could wait on a
        # dead peer's collective).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(err.code)


if __name__ == "__main__":
    main()
