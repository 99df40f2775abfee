"""The training driver: configuration, checkpoints, exact resume, failure handling (the
non-finite guard, stale temporaries, a second trainer, a kill between checkpoints), evaluation
and sampling entries, and data-parallel runs (2 gloo processes on the CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import TINY, params, run_cli

from vdm_fast import config
from vdm_fast.io import checkpoint as ckpt
from vdm_fast.training import train
from vdm_fast.training.run import RunLock


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


# --- configuration ----------------------------------------------------------------------------

def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("n_embd: 96\nsteps: 7\nschedule: nnet\n")
    cfg = config.parse_args(["--config", str(f), "--steps", "9", "--antithetic", "false"])
    assert (cfg.n_embd, cfg.steps, cfg.schedule, cfg.antithetic) == (96, 9, "nnet", False)
    assert cfg.n_layer == config.DATASET_DEFAULTS["digits"]["n_layer"]
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"lr": 0.01}))
    assert config.parse_args(["--config", str(j)]).lr == 0.01


def test_the_ops_backend_is_scoped_to_the_run(tmp_path, monkeypatch):
    from vdm_fast import backend

    seen = []
    monkeypatch.setattr(train, "_train", lambda cfg, job: seen.append(backend.current()) or {})
    before, environment = backend.current(), dict(os.environ)
    train.train(config.parse_args(["--out-dir", str(tmp_path), "--ops", "reference", *TINY]))
    assert seen == ["reference"] and backend.current() == before and dict(os.environ) == environment
    assert config.resolve({}).ops == "auto"
    assert config.resolve({"ops": "fused"}).ops == "auto"  # a config stored before the backends were named


def test_config_errors_name_the_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("n_embed: 96\n")
    with pytest.raises(ValueError, match="unknown fields.*n_embed"):
        config.parse_args(["--config", str(f)])
    with pytest.raises(ValueError, match="needs --data-dir"):
        config.parse_args(["--data", "cifar10"])
    with pytest.raises(ValueError, match="ema must be < 1.0"):
        config.parse_args(["--ema", "1.5"])
    with pytest.raises(SystemExit):
        config.parse_args(["--schedule", "cosine"])


@pytest.mark.parametrize("text, match", [
    ("antithetic: 'false'", "antithetic must be bool"), ("steps: 2.5", "steps must be int"),
    ("steps: true", "steps must be int"), ("n_embd: '32'", "n_embd must be int"),
    ("lr: .nan", "lr must be finite"), ("weight_decay: .nan", "weight_decay must be finite"),
    ("eval_T: -5", "eval_T must be >= 0"), ("sample_T: 0", "sample_T must be >= 1"),
    ("sample_n: -3", "sample_n must be >= 0"), ("guidance: .nan", "guidance must be finite"),
    ("dropout: 1.0", "dropout must be < 1.0"), ("gamma_min: 6.0", "gamma_min must be < gamma_max"),
])
def test_configuration_is_type_and_range_checked_before_training(tmp_path, text, match):
    f = tmp_path / "run.yaml"
    f.write_text(text + "\n")
    with pytest.raises((TypeError, ValueError), match=match):
        config.parse_args(["--config", str(f)])


def test_flags_are_range_checked_and_the_cli_says_so():
    for flag, value in (("--eval-T", "-5"), ("--sample-T", "0"), ("--sample-n", "-3"), ("--guidance", "nan"),
                        ("--lr", "nan"), ("--weight-decay", "nan")):
        proc = run_cli("vdm_fast.training.train", [flag, value, "--out-dir", "/nonexistent/never"])
        assert proc.returncode != 0 and proc.stderr.startswith("error: "), (flag, proc.stderr)
    # a YAML 1e-3 (a string to PyYAML) is a float by the stated rule
    assert config.resolve({"lr": "1e-3"}).lr == 1e-3


# --- training, checkpoints and resume ---------------------------------------------------------

def test_training_runs_and_reports_bpd_beside_the_baseline(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", "--ckpt-every", "2",
                                      "--eval-T", "5", *TINY])
    assert proc.returncode == 0, proc.stderr
    assert "test bpd (continuous time, EMA weights)" in proc.stdout and "histogram baseline" in proc.stdout
    assert "test bpd (T=5)" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert np.isfinite(result["test_bpd"]) and 1.0 < result["histogram_bpd"] < 4.1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and all(np.isfinite(m["bpd"]) for m in metrics)
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert (out / "samples.png").stat().st_size > 0
    state = params(out)
    assert state["step"] == 4 and state["data_position"] == {"epoch": 0, "batch": 4}

    # The evaluation and sampling entries work from the checkpoint.
    ev = run_cli("vdm_fast.training.evaluate", ["--ckpt", str(out / "checkpoint.pt"), "--batches", "1"])
    assert ev.returncode == 0 and "test bpd" in ev.stdout, ev.stderr
    grid = tmp_path / "s.png"
    sm = run_cli("vdm_fast.training.sample", ["--ckpt", str(out / "checkpoint.pt"), "--n", "4", "--T", "3", "--out", str(grid)])
    assert sm.returncode == 0 and grid.stat().st_size > 0, sm.stderr

    # Starting afresh over an existing run is refused; nothing is overwritten.
    before = (out / "checkpoint.pt").read_bytes()
    again = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", *TINY])
    assert again.returncode != 0 and "pass --resume" in again.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


def _interrupted_then_resumed(tmp_path, sig, steps, args):
    out = tmp_path / f"interrupted_{sig}"
    cmd = [sys.executable, "-m", "vdm_fast.training.train", "--out-dir", str(out), "--steps", str(steps), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/")
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    stopped_at = params(out)["step"]
    assert 0 < stopped_at < steps, f"the run was not interrupted mid-way (stopped at {stopped_at}): {err}"
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig and "Continue with --resume" in err
    resumed = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", str(steps), "--resume", *args])
    assert resumed.returncode == 0, resumed.stderr
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_and_resumed_run_matches_a_straight_run(tmp_path, sig):
    steps = 60
    args = [*TINY, "--ckpt-every", "5", "--sample-n", "0", "--dropout", "0.1"]
    straight = tmp_path / "straight"
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(straight), "--steps", str(steps), *args])
    assert proc.returncode == 0, proc.stderr
    resumed = _interrupted_then_resumed(tmp_path, sig, steps, args)
    assert_same_state(params(straight), params(resumed))


def test_resume_refuses_missing_corrupt_and_incompatible_checkpoints(tmp_path):
    out = tmp_path / "run"
    missing = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "2", "--resume", *TINY])
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr
    ok = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "2", *TINY, "--sample-n", "0"])
    assert ok.returncode == 0, ok.stderr
    other = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", "--resume",
                                       *TINY, "--n-embd", "64"])
    assert other.returncode != 0 and "n_embd" in other.stderr
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    corrupt = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", "--resume", *TINY])
    assert corrupt.returncode != 0 and "corrupt" in corrupt.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """Steps from the 5th on produce NaN: they are skipped and counted, the run stops after
    max_bad_steps of them, and the checkpoint of step 4 stays intact."""
    from vdm_fast.ops import loss as ops_loss  # the model's bound is composed there (ops.vlb_terms)

    real = ops_loss.diffusion_loss
    calls = {"n": 0}

    def poisoned_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(ops_loss, "diffusion_loss", poisoned_loss)
    cfg = config.parse_args(["--out-dir", str(tmp_path), "--steps", "20", "--ckpt-every", "4",
                             "--max-bad-steps", "3", *TINY])
    with pytest.raises(train.NonFiniteLoss, match="3 steps in a row.*untouched"):
        train.train(cfg)
    state = params(tmp_path)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("lr", ["inf", "1e6"])
def test_an_update_that_wrecks_the_weights_stops_without_writing(tmp_path, lr):
    out = tmp_path / "run"
    first = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "20", "--ckpt-every", "10", *TINY,
                                       "--sample-n", "0", "--eval-batches", "1"])
    assert first.returncode == 0, first.stderr
    good = (out / "checkpoint.pt").read_bytes()
    if lr == "inf":
        with pytest.raises(ValueError, match="lr must be finite"):
            config.parse_args(["--lr", "inf"])
        # Past the configuration check, the trainer's own guard still holds.
        cfg = config.parse_args(["--out-dir", str(out), "--resume", "--steps", "60", "--ckpt-every", "10", *TINY])
        cfg.lr = float("inf")
        with pytest.raises(train.NonFiniteLoss, match=r"non-finite.*step 20\), is untouched"):
            train.train(cfg)
    else:
        proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--resume", "--steps", "60", "--ckpt-every",
                                          "10", "--lr", lr, *TINY])
        # The weights stay finite but huge, the losses turn NaN: no checkpoint is written while
        # steps are non-finite, and the run stops after --max-bad-steps of them.
        assert proc.returncode == 1, proc.stderr
        assert "steps in a row had a non-finite loss" in proc.stderr and "(step 20), is untouched" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == good
    state = params(out)
    assert state["step"] == 20 and ckpt.first_non_finite(state) is None


def test_conditional_training_with_other_targets_and_guided_sampling(tmp_path):
    out = tmp_path / "cond"
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", *TINY, "--conditional",
                                      "--guidance", "1.5", "--prediction", "v", "--weighting", "sigmoid"])
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["objective"] != m["bpd"] for m in metrics)  # sigmoid weighting, not the ELBO
    state = params(out)
    assert state["num_classes"] == 10 and state["config"]["prediction"] == "v"
    grid = tmp_path / "three.png"
    sm = run_cli("vdm_fast.training.sample", ["--ckpt", str(out / "checkpoint.pt"), "--n", "3", "--T", "2", "--label", "3",
                                     "--guidance", "2", "--out", str(grid)])
    assert sm.returncode == 0 and grid.stat().st_size > 0, sm.stderr
    arr = np.zeros((12, 4, 4, 1), np.uint8)
    np.save(tmp_path / "unlabelled.npy", arr)
    refused = run_cli("vdm_fast.training.train", ["--out-dir", str(tmp_path / "x"), "--data", "npy", "--data-dir",
                                         str(tmp_path / "unlabelled.npy"), "--conditional", *TINY, "--batch-size", "4"])
    assert refused.returncode != 0 and "labelled dataset" in refused.stderr


# --- housekeeping after faults ----------------------------------------------------------------

def test_stale_temporaries_are_removed_and_a_second_trainer_is_locked_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / "checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    lock = RunLock(out)  # another trainer holds the folder
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "2", *TINY, "--sample-n", "0"])
    assert proc.returncode != 0 and "another process is training" in proc.stderr, proc.stderr
    assert stale.exists() and not (out / "checkpoint.pt").exists()
    lock.release()
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "2", *TINY, "--sample-n", "0"])
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and "removed" in proc.stderr


def test_metrics_hold_each_step_once_after_a_kill_and_resume(tmp_path):
    """A run killed between checkpoints leaves records past its checkpoint (here written as such
    a run writes them); the resumed run drops them before logging those steps again."""
    out = tmp_path / "run"
    args = [*TINY, "--ckpt-every", "4", "--log-every", "1", "--sample-n", "0", "--eval-batches", "1"]
    first = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", *args])
    assert first.returncode == 0, first.stderr
    metrics = out / "metrics.jsonl"
    records = metrics.read_text().splitlines()
    with open(metrics, "a") as fh:  # steps 5 and 6 of the killed run, and a line torn by the kill
        fh.write(records[-1].replace('"step": 4', '"step": 5') + "\n")
        fh.write(records[-1].replace('"step": 4', '"step": 6') + "\n" + records[-1][:20])
    resumed = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "8", "--resume", *args])
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))


# --- data-parallel: 2 gloo processes ----------------------------------------------------------

@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_dropout_and_label_dropout(tmp_path):
    # float32: under bf16 autocast (the default where the CPU has bf16 units) splitting the batch
    # over processes changes the convolutions' rounding at bf16's precision, ~1e-3.
    args = [*TINY, "--steps", "6", "--dropout", "0.3", "--conditional", "--label-dropout", "0.5",
            "--ckpt-every", "6", "--sample-n", "0", "--eval-batches", "1", "--bf16", "false"]
    one = run_cli("vdm_fast.training.train", ["--out-dir", str(tmp_path / "one"), *args])
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vdm_fast.training.train", "--out-dir", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, timeout=300, cwd="/",
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    for a, b in zip(*logs):
        assert a["bpd"] == pytest.approx(b["bpd"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    flat = [torch.cat([v.flatten() for v in params(tmp_path / run)["model"].values()]) for run in ("one", "two")]
    assert ((flat[0] - flat[1]).norm() / flat[0].norm()).item() < 1e-4
