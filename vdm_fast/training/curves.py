"""Learning curves of a run folder: ``curves.png``, and ``python -m vdm_fast.training.curves RUN_DIR``.

The plot has three panels: the train bits per dim of ``metrics.jsonl`` against the step and
against the wall time (``time_s``: the trainer's seconds since the run first started,
continued from the checkpoint's value on a resume, so the time between a stop and its resume
does not count), each with the test bpd of ``result.json`` marked (and the per-pixel histogram
baseline), and the learned noise schedule, ``gamma(t)`` and ``log SNR(t) = -gamma(t)`` on
``t`` in ``[0, 1]``, of the EMA weights.

The trainer draws it at the end of a run (after the final report) and whenever it writes a
checkpoint mid-run (the schedule of the EMA weights at that step, no test bpd yet);
``python -m vdm_fast.training.curves RUN_DIR`` redraws it for any run folder, with the schedule of the
folder's ``checkpoint.pt``. It needs matplotlib, the ``plot`` extra
(``pip install 'vdm_fast[plot]'``): without it the trainer says so once and skips the plot.

matplotlib is used through its object API (``matplotlib.figure.Figure`` on the Agg canvas),
never through ``pyplot``: no display, no global backend switch (a notebook that imports this
module keeps its own backend), no figure left open.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from vdm_fast import extras

NAME = "curves.png"
PLOT_EXTRA = "plot"


def missing_plot_extra() -> Optional[str]:
    """The one-line message naming the extra when matplotlib is not installed, else None."""
    try:
        extras.require(PLOT_EXTRA, library=True)
    except extras.MissingExtra as err:
        return f"{NAME} skipped: {err}"
    return None


def read_metrics(run_dir) -> list:
    """The records of ``metrics.jsonl`` (a line torn by a kill is skipped), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def read_result(run_dir) -> Optional[dict]:
    """``result.json`` of the run folder, or None where there is none (yet)."""
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) else None


@torch.no_grad()
def schedule_curve(model, ema: Optional[Sequence[torch.Tensor]] = None, n: int = 201):
    """``(t, gamma)`` as lists on ``n`` points of ``[0, 1]``: ``model.gamma`` (its first output)
    with the model's own weights, or with the EMA weights ``ema`` (one tensor per parameter, in
    ``model.parameters()`` order) swapped in for the schedule's parameters only, functionally
    (the model is not touched: safe in the middle of training)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    t = torch.linspace(0.0, 1.0, n, device=device, dtype=torch.float32)
    if ema is None:
        gamma = model.gamma(t)[0]
    else:
        from vdm_fast.nn.schedule import FixedLinearSchedule, gamma_and_derivative

        names = [name for name, _ in model.named_parameters()]
        weights = {name[len("schedule."):]: e for name, e in zip(names, ema) if name.startswith("schedule.")}
        schedule = model.schedule

        def ema_schedule(tt):
            return torch.func.functional_call(schedule, weights, (tt,))

        # As model.gamma: vdm_fast's schedule modules return (gamma, gamma') themselves.
        if isinstance(schedule, FixedLinearSchedule):
            gamma = ema_schedule(t)[0]
        else:
            gamma = gamma_and_derivative(ema_schedule, t)[0]
    return t.cpu().tolist(), gamma.detach().float().cpu().tolist()


def schedule_from_checkpoint(run_dir):
    """``(t, gamma, step)`` of the EMA weights of the run folder's ``checkpoint.pt``, or None
    where there is no checkpoint (a message on stderr where it cannot be read)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        return None
    from vdm_fast.io import CheckpointError, load_model

    try:
        model, _, state = load_model(path)
    except (CheckpointError, ValueError) as err:
        print(f"the schedule panel is left empty: {err}", file=sys.stderr)
        return None
    t, gamma = schedule_curve(model)
    return t, gamma, state.get("step")


def _smooth(values: list, window: int) -> list:
    """Trailing running mean over ``window`` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _finite(records, key):
    return [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def figure(records: list, result: Optional[dict] = None, schedule=None, title: str = "", config: Optional[dict] = None):
    """The learning-curve figure (a ``matplotlib.figure.Figure``, no pyplot): ``records`` of
    ``metrics.jsonl``, ``result`` of ``result.json`` (its ``test_bpd`` marked at its ``step``,
    else at the last step), ``schedule`` ``(t, gamma[, step])`` or None."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4.6), dpi=100, layout="constrained")
    ax_step, ax_time, ax_sched = fig.subplots(1, 3)
    fig.suptitle(title or "VDM training run", fontsize=13)
    config = config or {}
    points = _finite(records, "bpd")
    batch = config.get("batch_size")
    raw_label = f"train bpd (one batch{f' of {batch}' if batch else ''})"
    test = result.get("test_bpd") if result else None
    test = test if isinstance(test, (int, float)) and math.isfinite(test) else None
    test_step = result.get("step") if result and isinstance(result.get("step"), int) else (
        points[-1]["step"] if points else None)
    baseline = result.get("histogram_bpd") if result else None

    def curve(ax, key, xlabel):
        pts = [r for r in points if isinstance(r.get(key), (int, float))]
        if not pts:
            ax.text(0.5, 0.5, f"no '{key}' in metrics.jsonl\n(a run logged before vdm_fast recorded it)"
                    if points else "no metrics logged yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("bits per dim")
            return
        x, y = [r[key] for r in pts], [r["bpd"] for r in pts]
        window = max(1, len(y) // 20)
        ax.plot(x, y, color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=1 if window > 1 else 1.5,
                marker="." if len(y) <= 20 else None, label=raw_label)
        if window > 1:
            ax.plot(x, _smooth(y, window), color="tab:blue", linewidth=2,
                    label=f"train bpd, running mean of {window} records")
        if test is not None:
            at = next((r for r in pts if r["step"] == test_step), pts[-1])
            ax.plot([at[key]], [test], marker="*", markersize=15, color="tab:red", linestyle="none",
                    label=f"test bpd (EMA weights, step {at['step']}): {test:.4f}", zorder=5)
            ax.axhline(test, color="tab:red", linewidth=1, linestyle=":")
        if isinstance(baseline, (int, float)) and math.isfinite(baseline):
            ax.axhline(baseline, color="tab:gray", linewidth=1, linestyle="--",
                       label=f"per-pixel histogram baseline: {baseline:.4f}")
        # The first steps' bpd is far above the rest: keep the scale on the part that matters.
        tail = y[len(y) // 10:] + ([test] if test is not None else []) + (
            [baseline] if isinstance(baseline, (int, float)) and math.isfinite(baseline) else [])
        low, high = min(tail), max(tail)
        note = None
        if max(y) > high + 2 * (high - low) and high > low:
            ax.set_ylim(low - 0.1 * (high - low), high + 1.0 * (high - low))
            note = f"(early steps off the scale, up to {max(y):.2f})"
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per dim")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best", title=note, title_fontsize=8)

    curve(ax_step, "step", "optimiser step")
    ax_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_step.set_title("train bpd by step")
    curve(ax_time, "time_s", "wall time of the trainer (seconds, summed over resumes)")
    ax_time.set_title("train bpd by wall time")

    if schedule is not None:
        t, gamma = schedule[0], schedule[1]
        step = schedule[2] if len(schedule) > 2 else None
        ax_sched.plot(t, gamma, color="tab:purple", linewidth=2,
                      label=rf"$\gamma(t)$: $\gamma(0)$ = {gamma[0]:.2f}, $\gamma(1)$ = {gamma[-1]:.2f}")
        ax_sched.plot(t, [-g for g in gamma], color="tab:green", linewidth=2, label=r"log SNR$(t) = -\gamma(t)$")
        ax_sched.axhline(0.0, color="black", linewidth=0.6)
        kind = config.get("schedule")
        ax_sched.set_title(f"{'noise' if kind == 'fixed' else 'learned'} schedule{f' ({kind})' if kind else ''}, "
                           "EMA weights"
                           f"{f', step {step}' if step is not None else ''}")
        ax_sched.legend(fontsize=8, loc="upper center")
        ax_sched.grid(True, alpha=0.3)
    else:
        ax_sched.text(0.5, 0.5, "no checkpoint: no schedule", ha="center", va="center", transform=ax_sched.transAxes)
        ax_sched.set_title("learned schedule")
    ax_sched.set_xlabel("t (diffusion time)")
    ax_sched.set_ylabel(r"$\gamma$ and log SNR (natural log, no unit)")
    ax_sched.set_xlim(0.0, 1.0)
    return fig


def _title(run_dir, records, config: dict, schedule=None) -> str:
    name = Path(run_dir).resolve().name
    parts = [f"{name}: VDM on {config['data']}" if config.get("data") else name]
    if config.get("n_embd") is not None:
        parts.append(f"n_embd {config['n_embd']}, n_layer {config.get('n_layer')}")
    if records:
        last = records[-1]
        of = f" of {config['steps']}" if config.get("steps") else ""
        parts.append(f"step {last['step']}{of}")
        if isinstance(last.get("time_s"), (int, float)):
            parts.append(f"{last['time_s']:.0f} s")
    elif schedule is not None and len(schedule) > 2 and schedule[2] is not None:
        parts.append(f"step {schedule[2]}")
    return ", ".join(parts)


def plot_run(run_dir, schedule=None, result="read", path=None) -> Optional[Path]:
    """Draw the run folder's learning curves to ``path`` (default ``RUN_DIR/curves.png``,
    written atomically); returns the path, or None without matplotlib (nothing printed: see
    ``missing_plot_extra``). ``schedule``: ``(t, gamma[, step])``, or "checkpoint" to read the
    EMA weights of ``checkpoint.pt``, or None for no schedule panel; ``result``: a dict, None,
    or "read" for ``result.json``."""
    if missing_plot_extra() is not None:
        return None
    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / NAME
    records = read_metrics(run_dir)
    if isinstance(result, str):
        result = read_result(run_dir)
    if isinstance(schedule, str):
        schedule = schedule_from_checkpoint(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    fig = figure(records, result, schedule, _title(run_dir, records, config, schedule), config)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def figure_rgb(path):
    """The PNG at ``path`` as a ``[H, W, 3]`` uint8 array (for TensorBoard's ``add_image``)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# The TensorBoard tags of a metrics record (metrics.jsonl keeps the plain record).
SCALARS = {"bpd": "train/bpd", "objective": "train/objective", "reconstruction": "train/reconstruction",
           "prior": "train/prior", "diffusion": "train/diffusion", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "images_per_s": "train/images_per_s", "skipped_steps": "train/skipped_steps"}
SCHEDULE_POINTS = 101  # the schedule's TensorBoard series: step k is t = k / (SCHEDULE_POINTS - 1)


class RunPlots:
    """What the trainer's main process shows a researcher besides ``metrics.jsonl``:
    ``curves.png`` (at every mid-run checkpoint and at the end) and, with ``tensorboard``, the
    event files of ``OUT_DIR/tensorboard``. A plot that fails prints one warning and never stops
    the run; without matplotlib the plot is skipped with one line naming the extra."""

    def __init__(self, out_dir, tensorboard: bool = False, resume_step: Optional[int] = None):
        self.out = Path(out_dir)
        self.warned = False
        self.writer = None
        if tensorboard:
            extras.require("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides what the killed run logged past its checkpoint (as MetricsLog
            # drops those records), so every step has one value.
            self.writer = SummaryWriter(str(self.out / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def _say(self, line: str) -> None:
        if not self.warned:
            self.warned = True
            print(line, file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        """One metrics record as TensorBoard scalars at its step (flushed: nothing is lost to a
        kill that metrics.jsonl keeps)."""
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def plot(self, schedule, result) -> Optional[Path]:
        """Draw ``curves.png``; None where it was skipped (said once) or failed (a warning)."""
        missing = missing_plot_extra()
        if missing is not None:
            self._say(missing)
            return None
        try:
            return plot_run(self.out, schedule=schedule, result=result)
        except Exception as err:  # a plot must never cost a training run
            self._say(f"warning: {NAME} not drawn ({type(err).__name__}: {err})")
            return None

    def checkpoint(self, model, ema, step: int) -> None:
        """Mid-run: the curves so far and the schedule of the EMA weights (the model untouched)."""
        try:
            t, gamma = schedule_curve(model, ema)
        except Exception as err:
            self._say(f"warning: {NAME} not drawn ({type(err).__name__}: {err})")
            return
        result = read_result(self.out)  # a finished run's, resumed for more steps: marked at its step
        self.plot((t, gamma, step), result if result and isinstance(result.get("step"), int) else None)

    def final(self, model, result: dict) -> Optional[Path]:
        """After the final report (``model`` holds the EMA weights): the curves with the test
        bpd and the schedule; in TensorBoard the test bpd, the schedule and the plot."""
        step = result.get("step")
        t, gamma = schedule_curve(model)
        path = self.plot((t, gamma, step), result)
        if self.writer is not None:
            for key, value in result.items():
                if key.startswith(("test_bpd", "histogram_bpd")) and isinstance(value, (int, float)):
                    # test/bpd, test/bpd_T<eval_T>, test/histogram_bpd
                    self.writer.add_scalar("test/" + key.replace("test_bpd", "bpd"), value, step)
            self._schedule_series(model, step)
            if path is not None:
                self.writer.add_image("curves", figure_rgb(path), step, dataformats="HWC")
            self.writer.flush()
        return path

    def _schedule_series(self, model, step) -> None:
        """The schedule as scalar series over t (needs no matplotlib) in a run of its own,
        ``tensorboard/schedule``, whose "step" k is t = k / 100; each final report replaces the
        last one's (``purge_step=0`` hides the earlier events)."""
        from torch.utils.tensorboard import SummaryWriter

        _, grid_gamma = schedule_curve(model, n=SCHEDULE_POINTS)
        writer = SummaryWriter(str(self.out / "tensorboard" / "schedule"), purge_step=0)
        try:
            for k, g in enumerate(grid_gamma):
                writer.add_scalar("schedule/gamma", g, k)
                writer.add_scalar("schedule/log_snr", -g, k)
        finally:
            writer.close()
        self.writer.add_text("schedule", f"The learned schedule of the EMA weights at step {step}: the run "
                             f"'schedule' holds schedule/gamma and schedule/log_snr, gamma(t) and log SNR(t) = "
                             f"-gamma(t), at t = k / {SCHEDULE_POINTS - 1} (its x axis, 'step', is k).", step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def main(argv=None, prog=None):
    """The command line (``prog``: the program name of its usage lines, ``vdm-fast COMMAND`` under the
    ``vdm-fast`` console command)."""
    parser = argparse.ArgumentParser(prog=prog or "python -m vdm_fast.training.curves",
                                     description="Redraw the learning curves (curves.png) of a training run folder.")
    parser.add_argument("run_dir", help="a run folder of python -m vdm_fast.training.train (--out-dir)")
    parser.add_argument("--out", help=f"where to write the PNG (default RUN_DIR/{NAME})")
    args = parser.parse_args(argv)
    extras.require(PLOT_EXTRA)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise SystemExit(f"error: {run_dir} has no metrics.jsonl: not a vdm_fast.training.train run folder")
    path = plot_run(run_dir, schedule="checkpoint", path=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
