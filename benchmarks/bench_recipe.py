"""The digits recipe search: test bpd against wall time of finished training runs.

    python benchmarks/bench_recipe.py run ID [ID ...] [--threads N]   # train + evaluate, record
    python benchmarks/bench_recipe.py steptime ID [ID ...]            # 2-thread step time, quiet
    python benchmarks/bench_recipe.py plot                            # the front: PNG + table

``run`` trains each configuration of ``CONFIGS`` with ``vdm-fast train`` (a fresh run folder
under ``--work``), one after the other, and records the process's wall time and the test bpd of
its checkpoint as ``evaluate`` measures it with 64 stratified draws an image (seed 0, the 297
test images; standard error over images). Quality does not depend on the machine's load, wall
time does: runs made two at a time on one thread each (``--threads 1``) record their bpd, and
their wall time on a quiet machine is ``steptime``'s step time (2 threads, nothing else
running) times the steps, times the ratio of measured wall time to that product over the runs
measured quiet: those points are marked "estimated" in the table. The preset and the chosen
default are measured quiet, one after the other. Results go to ``--db`` (JSON, one entry per ID).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# id -> the flags of `vdm-fast train`: the earlier default (--preset digits-4000) and changes to
# it, and this version's default (no flags).
P = ["--preset", "digits-4000"]
CONFIGS = {
    "preset": P,
    "bf16": [*P, "--bf16", "true"],
    "b32": [*P, "--batch-size", "32"],
    "b32cos": [*P, "--batch-size", "32", "--lr-decay", "cosine"],
    "b32lin": [*P, "--batch-size", "32", "--lr-decay", "linear"],
    "b32lr3cos": [*P, "--batch-size", "32", "--lr", "3e-3", "--lr-decay", "cosine"],
    "b32d0cos": [*P, "--batch-size", "32", "--dropout", "0", "--lr-decay", "cosine"],
    "s2000lr3cos": [*P, "--steps", "2000", "--lr", "3e-3", "--lr-decay", "cosine"],
    "s2000lr3cosd0": [*P, "--steps", "2000", "--lr", "3e-3", "--lr-decay", "cosine", "--dropout", "0"],
    "s2000nnet": [*P, "--steps", "2000", "--lr", "3e-3", "--lr-decay", "cosine", "--schedule", "nnet"],
    "l1": [*P, "--n-layer", "1"],
    "l1bf16cos": [*P, "--n-layer", "1", "--bf16", "true", "--lr-decay", "cosine"],
    "l1bf16d0": [*P, "--n-layer", "1", "--bf16", "true", "--dropout", "0"],
    "l1bf16d0s4600": [*P, "--n-layer", "1", "--bf16", "true", "--dropout", "0", "--steps", "4600"],
    "l1bf16d0ema998": [*P, "--n-layer", "1", "--bf16", "true", "--dropout", "0", "--steps", "4600", "--ema", "0.998"],
    "l1bf16d0lr3": [*P, "--n-layer", "1", "--bf16", "true", "--dropout", "0", "--steps", "4600", "--lr", "3e-3"],
    "default": [],  # this version's digits default
    "default-s3600": ["--steps", "3600"],
    "default-b48": ["--batch-size", "48"],
    "default-s6500": ["--steps", "6500"],
    # measured on an AVX2-only machine (float32: no bf16 units)
    "l0": ["--n-layer", "0"],
    "l0lr4": ["--n-layer", "0", "--lr", "4e-3"],
    "default-v": ["--prediction", "v"],
    "default-lr4s3600": ["--lr", "4e-3", "--steps", "3600"],
    # measured on an AMX-BF16 machine: the default on the reference ops (no C++ GroupNorm, the
    # attention in bf16), for the step time the CPU kernels save
    "default-ref": ["--ops", "reference"],
}


def _evaluate(ckpt: Path) -> dict:
    from vdm_fast.training import data
    from vdm_fast.io import load_model_or_exit
    from vdm_fast.training.evaluate import evaluate

    model, cfg, state = load_model_or_exit(str(ckpt))
    ds = data.load(cfg.data, cfg.data_dir)
    r = evaluate(model, ds.test.images, draws=64, seed=0, batch_size=64)
    return {"bpd": r["bpd"], "se": r["se"], "steps": state["step"], "per_image": r["per_image"]}


def run(ids, work: Path, db: Path, threads: int) -> None:
    from vdm_fast.backend import CPU_NATIVE_BF16  # whether these runs trained in bf16 (--bf16's default)

    results = json.loads(db.read_text()) if db.exists() else {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ids:
        out = work / name
        cmd = ["vdm-fast", "train", "--out-dir", str(out), *CONFIGS[name]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        entry = {"flags": CONFIGS[name], "threads": threads, "cpu_bf16": CPU_NATIVE_BF16, "wall_s": wall,
                 "train_s": metrics[-1]["time_s"],
                 **_evaluate(out / "checkpoint.pt")}
        results[name] = entry
        db.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {entry['bpd']:.4f} +- {entry['se']:.4f} bpd, {wall:.0f} s wall ({threads} threads)", flush=True)


def steptime(ids, db: Path, steps: int = 20, rounds: int = 5) -> None:
    """Milliseconds per training step of each configuration, 2 threads: the median of ``rounds``
    rounds of ``steps`` steps, after 5 warm-up steps. The rounds of the configurations are
    interleaved (round 1 of each, then round 2 of each, ...), so that the machine's drift (a
    2-core cloud machine's speed moves within minutes: RESULTS.md, "The first run") falls on all of
    them alike."""
    import contextlib

    import torch

    from vdm_fast import backend
    from vdm_fast.config import parse_args
    from vdm_fast.training.train import Distributed, _Run

    results = json.loads(db.read_text()) if db.exists() else {}
    torch.set_num_threads(2)
    cfgs = {name: parse_args(CONFIGS[name]) for name in ids}

    def ops(name):  # --ops reference, as the trainer applies it around its run
        return backend.use("reference") if cfgs[name].ops == "reference" else contextlib.nullcontext()

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: _Run(parse_args([*CONFIGS[name], "--out-dir", f"{tmp}/{name}"]), Distributed("cpu"))
                    for name in ids}
        for name, trainer in trainers.items():
            with ops(name):
                for _ in range(5):
                    trainer.train_step()
        times = {name: [] for name in ids}
        for _ in range(rounds):
            for name, trainer in trainers.items():
                with ops(name):
                    start = time.perf_counter()
                    for _ in range(steps):
                        trainer.train_step()
                    times[name].append((time.perf_counter() - start) / steps * 1e3)
    for name in ids:
        ms = sorted(times[name])[rounds // 2]
        results.setdefault(name, {"flags": CONFIGS[name]})["step_ms"] = ms
        print(f"{name}: {ms:.1f} ms a step (rounds {', '.join(f'{t:.0f}' for t in times[name])})", flush=True)
    db.write_text(json.dumps(results, indent=1) + "\n")


def plot(db: Path, png: Path, marks: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(db.read_text())
    # A run's wall time against its steps times the step time: the same factor for every run
    # measured quiet (start-up, evaluation and samples cost about what the step time's
    # measurement, taken right after model building, overstates).
    quiet = [r for r in results.values() if r.get("threads") == 2 and "wall_s" in r and "step_ms" in r]
    factor = (sum(r["wall_s"] / (r["steps"] * r["step_ms"] / 1e3) for r in quiet) / len(quiet)) if quiet else 1.0
    rows = []
    for name, r in results.items():
        if "bpd" not in r:
            continue
        if r.get("threads") == 2:
            wall, kind = r["wall_s"], "measured"
        elif "step_ms" in r:
            wall, kind = r["steps"] * r["step_ms"] / 1e3 * factor, "estimated"
        else:
            continue
        rows.append((wall, r["bpd"], r["se"], name, kind, r))
    rows.sort()
    base = results.get("preset", {}).get("per_image")

    def paired(r):
        """The run's test bpd minus the preset's on the same images, and its standard error."""
        if not base or not r.get("per_image"):
            return None
        d = [a - b for a, b in zip(r["per_image"], base)]
        mean = sum(d) / len(d)
        return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5

    front, best = [], float("inf")
    for wall, bpd, _, name, *_ in rows:
        if bpd < best:
            front.append(name)
            best = bpd
    fig, ax = plt.subplots(figsize=(8, 5))
    for wall, bpd, se, name, kind, r in rows:
        diff = (0.0, 0.0) if name == "preset" else paired(r)
        if diff is None:
            continue
        ax.errorbar(wall, diff[0], yerr=diff[1], fmt="o", capsize=3, color="C0" if kind == "measured" else "C7")
        if name in marks or name in front:
            ax.annotate(marks.get(name, name), (wall, diff[0]), textcoords="offset points", xytext=(5, -12 if
                        name in marks else 5), fontsize=7)
    if "preset" in results and "wall_s" in results["preset"]:
        ax.axvline(0.5 * results["preset"]["wall_s"], color="C3", lw=0.8, ls="--",
                   label="half the preset's wall time (the target)")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("wall time on 2 CPU cores, s (blue: measured alone, one after the other; grey: estimated)")
    ax.set_ylabel("test bpd minus the preset's (same images, paired, +- s.e.)")
    ax.set_title("digits: finished runs, test bpd against wall time (labels: the front and the marked)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print("| run | flags | steps | ms a step | wall s | wall | test bpd | minus the preset's, paired |\n"
          "|---|---|---|---|---|---|---|---|")
    for wall, bpd, se, name, kind, r in rows:
        label = f"**{name}** ({marks[name]})" if name in marks else name
        diff = paired(r) if name != "preset" else None
        paired_text = f"{diff[0]:+.4f} +- {diff[1]:.4f}" if diff else ""
        step = f"{r['step_ms']:.1f}" if "step_ms" in r else ""
        print(f"| {label} | `{' '.join(r['flags']) or '(defaults)'}` | {r['steps']} | {step} | {wall:.0f} | {kind} "
              f"| {bpd:.4f} +- {se:.4f} | {paired_text} |")
    print(f"\nestimated: steps x step time x {factor:.3f} (the quiet runs' wall time over their steps x step time); "
          f"{png}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("run", "steptime", "plot"))
    parser.add_argument("ids", nargs="*", help=f"configurations: {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs (run)")
    parser.add_argument("--work", default=None, help="folder of the run folders (run; default: a temporary one)")
    parser.add_argument("--db", default=str(HERE / "recipe_runs.json"), help="the results (JSON)")
    parser.add_argument("--png", default=str(HERE / "recipe_front.png"))
    parser.add_argument("--mark", action="append", default=[], metavar="ID=TEXT",
                        help="label a point in the plot and table, e.g. preset='digits-4000 preset'")
    args = parser.parse_args(argv)
    ids = args.ids or list(CONFIGS)
    unknown = [i for i in ids if i not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    db = Path(args.db)
    if args.what == "run":
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vdm_recipe_"))
        run(ids, work, db, args.threads)
    elif args.what == "steptime":
        steptime(ids, db)
    else:
        plot(db, Path(args.png), dict(m.split("=", 1) for m in args.mark))


if __name__ == "__main__":
    main()
