"""The training driver: configuration, data, checkpoints, exact resume, failure handling,
evaluation and sampling entries, and data-parallel runs (2 gloo processes on the CPU)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vdm_fast import config
from vdm_fast.training import data, train
from vdm_fast.io.checkpoint import load

TINY = ["--n-embd", "32", "--n-layer", "1", "--batch-size", "16", "--log-every", "2",
        "--sample-n", "4", "--sample-T", "3", "--eval-batches", "2", "--warmup", "5"]


def run_cli(module, args, timeout=300, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd="/", **kwargs)


def params(run_dir):
    return load(Path(run_dir) / "checkpoint.pt")


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


# --- data -------------------------------------------------------------------------------------

def test_digits_split_is_deterministic_and_17_valued():
    a, b = data.load_digits(), data.load_digits()
    assert a.train.images.shape == (1500, 1, 8, 8) and a.test.images.shape == (297, 1, 8, 8)
    assert a.vocab_size == 17 and a.train.images.max() == 16 and a.train.images.dtype == torch.uint8
    assert torch.equal(a.test.images, b.test.images)
    baseline = data.histogram_bpd(a.train.images, a.test.images, 17)
    assert 1.0 < baseline < np.log2(17)


def _fake_cifar(folder: Path):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_cifar10_from_folder_and_archive(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    from_folder = data.load("cifar10", str(tmp_path))
    assert from_folder.train.images.shape == (20, 3, 32, 32) and from_folder.test.images.shape == (4, 3, 32, 32)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_archive = data.load("cifar10", str(archive))
    assert torch.equal(from_archive.train.images, from_folder.train.images)


def test_imagenet_npz_and_plain_arrays(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("train_data_batch_1.npz", "train_data_batch_2.npz", "val_data.npz"):
        np.savez(tmp_path / name, data=rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8),
                 labels=np.array([1, 2, 1000]))
    ds = data.load("imagenet32", str(tmp_path))
    assert ds.train.images.shape == (6, 3, 32, 32) and ds.test.labels.tolist() == [0, 1, 999]
    arr = rng.integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", arr)
    ds = data.load("npy", str(tmp_path / "imgs.npy"))
    assert ds.train.images.shape == (18, 3, 5, 6) and ds.test.images.shape == (2, 3, 5, 6)


@pytest.mark.parametrize("name, make, match", [
    ("cifar10", lambda p: p, "CIFAR-10 not found"),
    ("cifar10", lambda p: (p.mkdir(), p)[1], "lacks the CIFAR-10 batches"),
    ("cifar10", lambda p: (p.write_bytes(b"not a tar"), p)[1], "not a readable tar archive"),
    ("imagenet64", lambda p: (p.mkdir(), p)[1], "train_data_batch_"),
    ("npy", lambda p: (np.save(p.with_suffix(".npy"), np.zeros((3, 4, 4), np.uint8)), p.with_suffix(".npy"))[1],
     r"uint8 \[N, H, W, C\]"),
    ("npy", lambda p: (np.save(p.with_suffix(".npy"), np.zeros((3, 4, 4, 1), np.float32)), p.with_suffix(".npy"))[1],
     "must be uint8"),
])
def test_missing_or_malformed_data_says_what_and_where(tmp_path, name, make, match):
    path = make(tmp_path / "data")
    with pytest.raises(data.DataError, match=match):
        data.load(name, str(path))


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
    from vdm_fast.nn import vdm as vdm_module

    real = vdm_module.ops.diffusion_loss
    calls = {"n": 0}

    def poisoned_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(vdm_module.ops, "diffusion_loss", poisoned_loss)
    cfg = config.parse_args(["--out-dir", str(tmp_path), "--steps", "20", "--ckpt-every", "4",
                             "--max-bad-steps", "3", *TINY])
    with pytest.raises(train.NonFiniteLoss, match="3 steps in a row.*untouched"):
        train.train(cfg)
    state = params(tmp_path)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


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
