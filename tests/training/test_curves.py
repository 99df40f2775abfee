"""What a run folder shows a researcher: ``curves.png`` (and ``python -m vdm_fast.training.curves``), the
wall time of every metrics record (across a resume), TensorBoard event files
(``--tensorboard``), and the one-line messages without the optional extras."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdm_fast import extras, config
from vdm_fast.training import curves, train
from vdm_fast.factory import build_model

from helpers import TINY, run_cli

# TINY logs every 2 steps; these tests log every step.
FAST = [*TINY, "--log-every", "1"]


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_png(path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
        assert 800 <= width <= 3000 and 300 <= height <= 1500 and width > height, image.size
        # A drawn figure, not a blank canvas: many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_a_run_leaves_curves_png_and_timed_metrics_and_the_cli_redraws_it(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", "--ckpt-every", "2", *FAST])
    assert proc.returncode == 0, proc.stderr
    assert "learning curves:" in proc.stdout and "curves.png" in proc.stdout
    assert_png(out / "curves.png")
    metrics = records(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    times = [m["time_s"] for m in metrics]
    assert all(0 < a < b for a, b in zip(times, times[1:])), times
    assert json.loads((out / "result.json").read_text())["step"] == 4  # where the test bpd is marked

    (out / "curves.png").unlink()
    redraw = run_cli("vdm_fast.training.curves", [str(out)])
    assert redraw.returncode == 0, redraw.stderr
    assert_png(out / "curves.png")
    elsewhere = tmp_path / "elsewhere.png"
    curves.main([str(out), "--out", str(elsewhere)])
    assert_png(elsewhere)
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        curves.main([str(tmp_path)])


def test_a_folder_from_before_time_s_and_without_a_checkpoint_still_plots(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [json.dumps({"step": s, "bpd": 5.0 / s, "objective": 5.0 / s}) for s in range(1, 60)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n{torn")
    (tmp_path / "result.json").write_text(json.dumps({"test_bpd": 0.2, "histogram_bpd": 2.4}))
    assert curves.plot_run(tmp_path, schedule="checkpoint") == tmp_path / "curves.png"
    assert_png(tmp_path / "curves.png")


@pytest.mark.parametrize("schedule", ["scalar", "nnet"])
def test_the_schedule_of_the_ema_weights_leaves_the_model_untouched(schedule):
    cfg = config.parse_args([*TINY, "--schedule", schedule])
    model = build_model(cfg, (1, 8, 8), 17, 0)
    before = [p.detach().clone() for p in model.parameters()]
    ema = [p.detach() + 0.05 * torch.randn_like(p) for p in model.parameters()]
    t, gamma = curves.schedule_curve(model, ema)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    t2, gamma2 = curves.schedule_curve(model)
    assert t == t2 and len(t) == 201 and t[0] == 0.0 and t[-1] == 1.0
    assert torch.allclose(torch.tensor(gamma), torch.tensor(gamma2), atol=1e-5)
    assert gamma != curves.schedule_curve(build_model(cfg, (1, 8, 8), 17, 0))[1]  # the EMA weights did count


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_every_logged_step_once_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    first = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", "--tensorboard", *FAST])
    assert first.returncode == 0, first.stderr
    assert f"tensorboard --logdir {out / 'tensorboard'}" in first.stdout
    again = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "6", "--resume", "--tensorboard", *FAST])
    assert again.returncode == 0, again.stderr

    # time_s continues from the checkpoint's value.
    metrics = records(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    times = [m["time_s"] for m in metrics]
    assert all(a < b for a, b in zip(times, times[1:])), times
    assert torch.load(out / "checkpoint.pt", weights_only=True)["time_s"] >= times[-1]

    acc = _scalars(out / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for tag in curves.SCALARS.values():
        assert tag in tags, (tag, tags)
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4, 5, 6], tag
        assert [e.value for e in events] == pytest.approx([m[tag.split("/")[1]] for m in metrics], rel=1e-6), tag
    result = json.loads((out / "result.json").read_text())
    test = acc.Scalars("test/bpd")
    assert test[-1].step == 6 and test[-1].value == pytest.approx(result["test_bpd"], rel=1e-6)
    assert "test/histogram_bpd" in tags

    schedule = _scalars(out / "tensorboard" / "schedule")
    gamma = schedule.Scalars("schedule/gamma")
    assert [e.step for e in gamma] == list(range(curves.SCHEDULE_POINTS))  # the last report's only
    log_snr = [e.value for e in schedule.Scalars("schedule/log_snr")]
    assert log_snr == pytest.approx([-e.value for e in gamma])
    assert gamma[0].value < gamma[-1].value  # gamma increases in t
    if curves.missing_plot_extra() is None:
        assert "curves" in acc.Tags()["images"]


def test_without_the_tensorboard_extra_the_run_stops_at_start_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "tensorboard", ("vdm_fast_no_such_module",))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.train(config.parse_args(["--out-dir", str(out), "--steps", "2", "--tensorboard", *FAST]))
    message = str(stop.value.code)
    assert "\n" not in message and "pip install 'vdm_fast[tensorboard]'" in message
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()


def test_without_matplotlib_the_run_skips_the_plot_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(extras.EXTRAS, "plot", ("vdm_fast_no_such_module",))
    out = tmp_path / "run"
    # A mid-run checkpoint (step 2) and the end both want a plot: the line is said once.
    result = train.train(config.parse_args(["--out-dir", str(out), "--steps", "3", "--ckpt-every", "2", *FAST]))
    assert result["step"] == 3 and (out / "result.json").exists()
    assert not (out / "curves.png").exists()
    err = capsys.readouterr().err
    assert err.count("pip install 'vdm_fast[plot]'") == 1, err
    with pytest.raises(SystemExit, match=r"pip install 'vdm_fast\[plot\]'"):
        curves.main([str(out)])


@pytest.mark.slow
def test_under_torchrun_only_rank_0_writes_the_plot_and_the_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vdm_fast.training.train", "--out-dir", str(out), "--steps", "4", "--tensorboard",
                           "--ckpt-every", "2", *FAST], capture_output=True, text=True, timeout=300, cwd="/",
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list((out / "tensorboard" / "schedule").glob("events.out.tfevents.*"))) == 1
    acc = _scalars(out / "tensorboard")
    assert [e.step for e in acc.Scalars("train/bpd")] == [1, 2, 3, 4]
    assert [m["step"] for m in records(out)] == [1, 2, 3, 4]
    if curves.missing_plot_extra() is None:
        assert_png(out / "curves.png")
