"""Train a VDM and report its test-set likelihood: ``python -m vdm_fast.train [flags]``.

With no flags it trains the small default model on scikit-learn's bundled digits on the CPU
(minutes on 2 cores) and prints the test bits per dim beside the per-pixel histogram baseline.
``torchrun --nproc_per_node N -m vdm_fast.train ...`` runs data-parallel (NCCL on GPUs, gloo on
CPUs), with the same results as one process at the same global batch.

Reproducibility: the data order, the times and noises of the bound and the dropout masks are
all functions of ``(seed, step)`` (and the rank, for dropout), never of a running RNG, so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vdm_fast import checkpoint as ckpt
from vdm_fast import data as datasets
from vdm_fast.config import TrainConfig, parse_args, to_dict
from vdm_fast.evaluate import test_bpd
from vdm_fast.reference.schedule import antithetic_times
from vdm_fast.sample import save_grid


class NonFiniteLoss(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic, unlike Python's hash of a tuple across runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & (2**63 - 1)
    return h


class Distributed:
    """This process's place in a torchrun job (or a job of one)."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_min(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.item()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


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
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        start = pos * self.global_batch + self.rank * self.local
        return self._perm[start:start + self.local]


def _noise(cfg: TrainConfig, step: int, shape, rank: int, local: int):
    """The step's times and noises for the whole global batch, sliced to this process."""
    gen = torch.Generator().manual_seed(_mix(cfg.seed, step, 1))
    B = cfg.batch_size
    if cfg.antithetic:
        t = antithetic_times(B, generator=gen, dtype=torch.float32)
    else:
        t = torch.rand(B, generator=gen)
    eps = torch.randn((B, *shape), generator=gen)
    eps_0 = torch.randn((B, *shape), generator=gen)
    part = slice(rank * local, (rank + 1) * local)
    return t[part], eps[part], eps_0[part]


def _param_groups(model, weight_decay: float):
    """AdamW groups: decay on every parameter but biases (schedule parameters included)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device_kind(cfg: TrainConfig) -> str:
    return cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if _device_kind(cfg) == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns the final metrics."""
    if cfg.ops == "reference":
        os.environ["VDM_FAST_BACKEND"] = "reference"
    job = Distributed(_device_kind(cfg))
    try:
        return _train(cfg, job)
    finally:
        job.close()


def _train(cfg: TrainConfig, job: Distributed) -> dict:
    device = _device(cfg, job.local_rank)
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if job.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists() and not cfg.resume:
            raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue that run, "
                             "or choose another --out-dir (nothing was overwritten)")
    job.barrier()

    try:
        ds = datasets.load(cfg.data, cfg.data_dir)
    except datasets.DataError as err:
        raise SystemExit(f"error: {err}")
    shape = ds.image_shape
    torch.manual_seed(cfg.seed)
    try:
        model = ckpt.build_model(cfg, shape, ds.vocab_size, ds.num_classes).to(device)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)

    step, bad_in_row, skipped = 0, 0, 0
    if cfg.resume:
        try:
            state = ckpt.load(ckpt_path)
            ckpt.check_compatible(state, cfg, ckpt_path)
        except ckpt.CheckpointError as err:
            raise SystemExit(f"error: cannot resume: {err}")
        model.load_state_dict(state["model"])
        for e, v in zip(ema, state["ema"].values()):
            e.copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        step, skipped = state["step"], state["skipped_steps"]
        if job.main:
            print(f"resumed {ckpt_path} at step {step}", file=sys.stderr)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if job.world > 1 else model
    sampler = BatchSampler(len(ds.train.images), cfg.batch_size, cfg.seed, job.rank, job.world)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16
                else contextlib.nullcontext())
    params = list(model.parameters())
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf

    def state_dict():
        names = [n for n, _ in model.named_parameters()]
        return {
            "config": to_dict(cfg), "step": step, "skipped_steps": skipped,
            "model": model.state_dict(), "ema": dict(zip(names, ema)), "optimizer": optimizer.state_dict(),
            "image_shape": list(shape), "vocab_size": ds.vocab_size, "num_classes": model.num_classes,
            "data_position": dict(zip(("epoch", "batch"), sampler.position(step))),
            # Every random draw is a function of (seed, step, rank): this is the whole RNG state.
            "rng": {"seed": cfg.seed, "derived_from": "seed, step, rank"},
        }

    def save_checkpoint():
        if job.main:
            ckpt.save(ckpt_path, state_dict())

    if job.main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    metrics_file = open(out / "metrics.jsonl", "a") if job.main else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not job.main, dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    ddp.train()
    with StopRequest() as stop:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            torch.manual_seed(_mix(cfg.seed, step, job.rank, 2))  # dropout masks
            idx = sampler.indices(step)
            x = ds.train.images[idx].to(device)
            labels = ds.train.labels[idx].to(device) if model.num_classes else None
            t, eps, eps_0 = _noise(cfg, step, shape, job.rank, sampler.local)
            with autocast:
                terms = ddp(x, T=cfg.T, t=t, eps=eps.to(device), eps_0=eps_0.to(device), labels=labels)
            loss = terms.objective.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # A non-finite loss anywhere makes the all-reduced gradient non-finite everywhere,
            # so every process takes the same decision from its gradient norm.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
            if math.isfinite(grad_norm):
                optimizer.step()
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - cfg.ema)
                bad_in_row = 0
            else:
                skipped += 1
                bad_in_row += 1
                if bad_in_row >= cfg.max_bad_steps:
                    bar.close()
                    raise NonFiniteLoss(
                        f"{bad_in_row} steps in a row had a non-finite loss or gradient (step {step}); "
                        f"stopping. The last good checkpoint, {ckpt_path}, is untouched.")
            step += 1
            window_images += cfg.batch_size
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                values = job.mean(torch.stack([v.detach().float().mean() for v in terms]).cpu())
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "bpd": values[3].item(), "objective": values[4].item(),
                          "reconstruction": values[0].item(), "prior": values[1].item(), "diffusion": values[2].item(),
                          "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                          "images_per_s": window_images / elapsed, "skipped_steps": skipped}
                window_start, window_images = time.perf_counter(), 0
                if job.main:
                    bar.set_postfix(bpd=f"{record['bpd']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            stop_now = job.all_min(0.0 if stop.signum else 1.0) == 0.0
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now:
                save_checkpoint()
            if stop_now:
                bar.close()
                if job.main:
                    print(f"\nstopped by signal at step {step}; checkpoint saved to {ckpt_path}. "
                          f"Continue with --resume.", file=sys.stderr)
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    bar.close()
    if metrics_file:
        metrics_file.close()

    result = {"step": step, "skipped_steps": skipped}
    if job.main:
        result.update(_final_report(cfg, model, ema, ds, device, out))
    job.barrier()
    return result


def _final_report(cfg, model, ema, ds, device, out: Path) -> dict:
    """Test bpd with the EMA weights beside the histogram baseline, and a sample grid."""
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    def bpd(T):
        return test_bpd(model, ds.test.images, cfg.batch_size, T=T, max_batches=cfg.eval_batches, device=device,
                        seed=cfg.seed, progress=True, labels=ds.test.labels if model.num_classes else None)

    report = {"test_bpd": bpd(0),
              "histogram_bpd": datasets.histogram_bpd(ds.train.images, ds.test.images, ds.vocab_size)}
    if cfg.eval_T:
        report[f"test_bpd_T{cfg.eval_T}"] = bpd(cfg.eval_T)
    lines = [f"test bpd (continuous time, EMA weights): {report['test_bpd']:.4f}"]
    if cfg.eval_T:
        lines.append(f"test bpd (T={cfg.eval_T}):                  {report[f'test_bpd_T{cfg.eval_T}']:.4f}")
    lines.append(f"per-pixel histogram baseline:            {report['histogram_bpd']:.4f}")
    if cfg.sample_n:
        model.eval()
        labels = torch.arange(cfg.sample_n, device=device) % model.num_classes if model.num_classes else None
        images = model.sample(cfg.sample_n, cfg.sample_T, generator=torch.Generator(device).manual_seed(cfg.seed),
                              labels=labels, guidance=cfg.guidance)
        save_grid(images, ds.vocab_size, out / "samples.png", scale=max(1, 128 // ds.image_shape[-1]))
        lines.append(f"samples (T={cfg.sample_T}):                     {out / 'samples.png'}")
    (out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return report


def main(argv=None):
    try:
        cfg = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    try:
        train(cfg)
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
