"""Hostile inputs and faults: files that try to run code, updates that wreck the weights,
damaged checkpoints and streams, wrong configurations and data, ops fed what they must refuse,
and the housekeeping after a kill. Each test here failed on the code before it was written."""

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vdm_fast.io import checkpoint as ckpt
from vdm_fast.io import load_model
from vdm_fast.codec import compress
from vdm_fast import config, ops
from vdm_fast.training import data, train
from vdm_fast.io.checkpoint import CheckpointError
from vdm_fast.training.run import RunLock

from test_train import TINY, _fake_cifar, params, run_cli


class _WritesMarker:
    """Unpickling this would create the file ``path``: the proof that a loader ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run on digits with a checkpoint (shared, read-only for the tests)."""
    out = tmp_path_factory.mktemp("trained")
    proc = run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--steps", "4", *TINY, "--sample-n", "0"])
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoint.pt"


def _resume_from(tmp_path, checkpoint: Path):
    """``train --resume`` of a run folder whose checkpoint is ``checkpoint`` (moved there)."""
    out = tmp_path / "run"
    out.mkdir()
    checkpoint.replace(out / "checkpoint.pt")
    return run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--resume", "--steps", "6", *TINY])


def _cifar_folder(root: Path, replace=None) -> Path:
    """A CIFAR-10 folder of small fake batches, some of them ``replace``d by another batch dict
    or by raw bytes."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "cifar-10-batches-py"
    _fake_cifar(folder)
    for name, batch in (replace or {}).items():
        if isinstance(batch, bytes):
            (folder / name).write_bytes(batch)
        else:
            with open(folder / name, "wb") as fh:
                pickle.dump(batch, fh)
    return folder


# --- 1. loading a file never runs code ------------------------------------------------------

def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, trained):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "config": _WritesMarker(marker)}, evil)
    with pytest.raises(CheckpointError, match="could run code"):
        ckpt.load(evil)
    for module, args in (("vdm_fast.training.evaluate", ["--ckpt", str(evil)]),
                         ("vdm_fast.training.sample", ["--ckpt", str(evil), "--out", str(tmp_path / "s.png")])):
        proc = run_cli(module, args)
        assert proc.returncode != 0 and "could run code" in proc.stderr, proc.stderr
    proc = _resume_from(tmp_path, evil)
    assert proc.returncode != 0 and "could run code" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _cifar_folder(tmp_path, {"data_batch_3": {b"data": np.zeros((2, 3072), np.uint8), b"labels": _WritesMarker(marker)}})
    with pytest.raises(data.DataError, match="data_batch_3.*refused to load pathlib"):
        data.load("cifar10", str(tmp_path))
    assert not marker.exists()


# --- 2. the non-finite guard never overwrites the last good checkpoint -----------------------

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


def test_a_non_finite_state_is_never_written(tmp_path, trained):
    state = ckpt.load(trained)
    first = next(iter(state["ema"]))
    state["ema"][first] = state["ema"][first].clone().fill_(float("nan"))
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(CheckpointError, match=f"ema.{first} holds non-finite"):
        ckpt.save(target, {k: v for k, v in state.items() if k not in ("format", "sha256")})
    assert target.read_bytes() == b"the previous checkpoint"


# --- 3. a damaged checkpoint never loads ------------------------------------------------------

def test_bit_flips_never_load_changed_weights(tmp_path, trained):
    original = ckpt.load(trained)
    blob = bytearray(trained.read_bytes())
    rng = np.random.default_rng(1)
    flipped = tmp_path / "flipped.pt"
    refused = 0
    for _ in range(60):
        damaged = bytearray(blob)
        bit = int(rng.integers(0, 8 * len(blob)))
        damaged[bit // 8] ^= 1 << (bit % 8)
        flipped.write_bytes(damaged)
        try:
            state = ckpt.load(flipped)
        except CheckpointError:
            refused += 1
            continue
        # A flip in bytes that carry no content (zip padding, names' case...) may load, but
        # only as the very same contents.
        assert state["sha256"] == original["sha256"] == ckpt.digest(state)
    assert refused >= 50
    flipped.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        ckpt.load(flipped)


def _resave(state, path, **changes):
    state = {k: v for k, v in state.items() if k not in ("format", "sha256")}
    state.update(changes)
    ckpt.save(path, state)


def test_checkpoints_with_the_wrong_content_are_refused_by_name(tmp_path, trained):
    state = ckpt.load(trained)
    bad = tmp_path / "bad.pt"
    without_ema = {k: v for k, v in state.items() if k not in ("format", "sha256", "ema")}
    ckpt.save(bad, without_ema)
    with pytest.raises(CheckpointError, match="lacks a valid 'ema'"):
        load_model(bad)
    name = next(n for n, t in state["ema"].items() if t.dim() == 4)
    _resave(state, bad, ema={**state["ema"], name: state["ema"][name][:, :1]})
    with pytest.raises(CheckpointError, match=f"{name} has shape"):
        load_model(bad)
    _resave(state, bad, ema={k: v for k, v in state["ema"].items() if k != name})
    with pytest.raises(CheckpointError, match=f"missing \\['{name}'"):
        load_model(bad)
    _resave(state, bad, config={**state["config"], "n_embd": "wide"})
    with pytest.raises(CheckpointError, match="invalid configuration.*n_embd"):
        load_model(bad)
    # Another vocabulary: the weights fit, the data do not. evaluate and resume refuse it.
    _resave(state, bad, vocab_size=256)
    proc = run_cli("vdm_fast.training.evaluate", ["--ckpt", str(bad)])
    assert proc.returncode != 0 and "256-level images" in proc.stderr, proc.stderr
    proc = _resume_from(tmp_path, bad)
    assert proc.returncode != 0 and "vocab_size=256" in proc.stderr, proc.stderr


# --- 4. ops return an error, or NaN, never a plausible wrong number ----------------------------

def test_variance_gradients_check_every_shape():
    B, n = 6, 8
    t = torch.rand(B, dtype=torch.float64)
    net = [torch.randn(1, 1, dtype=torch.float64), torch.randn(1, dtype=torch.float64),
           torch.randn(n, 1, dtype=torch.float64), torch.randn(n, dtype=torch.float64),
           torch.randn(1, n, dtype=torch.float64)]
    g, dg, loss = (torch.randn(B, dtype=torch.float64) for _ in range(3))
    ops.variance_gradients(t, net, g, dg, loss)  # well-formed: accepted
    for bad in (dict(loss=loss[:, None]), dict(grad_gamma=g[:1]), dict(grad_dgamma=dg[:, None]),
                dict(loss=loss.float().to("meta"))):
        args = {**dict(grad_gamma=g, grad_dgamma=dg, loss=loss), **bad}
        name = next(iter(bad))
        with pytest.raises((ValueError, TypeError), match=name):
            ops.variance_gradients(t, net, **args)


def test_every_optional_tensor_is_checked():
    B = 3
    eps, pred = torch.randn(B, 4), torch.randn(B, 4)
    dg, g = torch.rand(B), torch.randn(B)
    with pytest.raises(ValueError, match="x is a meta tensor"):
        ops.diffusion_loss(eps, pred, dg, prediction="x", x=torch.empty(B, 4, device="meta"), gamma_t=g)
    with pytest.raises(ValueError, match="x must have the shape"):
        ops.diffusion_loss(eps, pred, dg, x=torch.randn(B, 5))  # unused by eps, checked all the same
    x = torch.randn(2, 32, 4, 4)
    C = 32
    weights = dict(norm_weight=torch.ones(C), norm_bias=torch.zeros(C), w_qkv=torch.randn(3 * C, C),
                   b_qkv=torch.zeros(3 * C), w_out=torch.randn(C, C), b_out=torch.zeros(C))
    with pytest.raises(ValueError, match="w_out is a meta tensor"):
        ops.attention_block(x, **{**weights, "w_out": torch.empty(C, C, device="meta")})
    with pytest.raises(TypeError, match="w_out is torch.float64 but w_qkv is torch.float32"):
        ops.attention_block(x, **{**weights, "w_out": torch.randn(C, C, dtype=torch.float64)})
    with pytest.raises(TypeError, match="x is torch.float64 but the weights are torch.float32"):
        ops.attention_block(x.double(), **weights)
    with pytest.raises(ValueError, match="num_groups must be > 0"):
        ops.attention_block(x, **weights, num_groups=0)
    with pytest.raises(ValueError, match="num_groups must be > 0"):
        ops.group_norm_silu(x, torch.ones(C), torch.zeros(C), num_groups=0)
    with pytest.raises(ValueError, match="cond is a meta tensor"):
        ops.group_norm_silu(x, torch.ones(C), torch.zeros(C), cond=torch.empty(2, C, device="meta"))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        ops.group_norm_silu(x, [1.0] * C, torch.zeros(C))
    t = torch.rand(4)
    w = [torch.randn(1, 1), torch.randn(1), torch.randn(5, 1), torch.randn(5), torch.randn(1, 5)]
    with pytest.raises(TypeError, match="gamma_1 must have t's dtype"):
        ops.gamma_nnet_pinned(t, *w, torch.zeros(1), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_wide_images_are_refused_by_name(dtype):
    x = torch.randint(0, 256, (2, 6)).to(dtype)
    with pytest.raises(TypeError, match="x must hold integer values.*convert with x.long"):
        ops.reconstruction_loss(x, torch.randn(2, 6), torch.full((2,), -5.0))


def test_a_huge_vocabulary_is_refused_by_name():
    with pytest.raises(ValueError, match=r"vocab_size must be in \[2, 65536\]"):
        ops.reconstruction_loss(torch.zeros(2, 6, dtype=torch.long), torch.randn(2, 6), torch.zeros(2),
                                vocab_size=2**31)


def test_float_images_get_a_conversion_hint():
    img = torch.rand(2, 6)
    with pytest.raises(ValueError, match=r"\(img \* 255\).round\(\)"):
        ops.reconstruction_loss(img, torch.randn(2, 6), torch.zeros(2))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("bad", [300, -1, 2.5, float("nan")])
def test_invalid_images_give_nan_where_checks_cannot_run(use_backend, backend, bad):
    """Inside torch.compile the value checks are skipped (they would need a host sync): the
    kernels and the reference then make the example's loss and gradient NaN."""
    use_backend(backend)
    x = torch.randint(0, 256, (3, 10)).double()
    x[1, 4] = bad
    eps = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    gamma = torch.full((3,), -6.0, dtype=torch.float64)
    with pytest.raises(ValueError):  # eager: refused
        ops.reconstruction_loss(x, eps, gamma)
    torch._dynamo.reset()
    compiled = torch.compile(ops.reconstruction_loss, backend="aot_eager", fullgraph=True)
    loss = compiled(x, eps, gamma)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(eps.grad[1]).any() and torch.isfinite(eps.grad[[0, 2]]).all()
    torch._dynamo.reset()


# --- clear errors: configuration, data, streams ---------------------------------------------

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


def test_malformed_data_gives_one_line_errors_naming_the_file(tmp_path):
    np.save(tmp_path / "nchw.npy", np.zeros((20, 1, 8, 8), np.uint8))
    with pytest.raises(data.DataError, match=r"nchw.npy.*C = 8 channels.*transpose"):
        data.load("npy", str(tmp_path / "nchw.npy"))
    _cifar_folder(tmp_path / "labels", {"data_batch_1": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}})
    with pytest.raises(data.DataError, match="data_batch_1 has 2 images but labels of shape"):
        data.load("cifar10", str(tmp_path / "labels"))
    _cifar_folder(tmp_path / "garbage", {"test_batch": b"\x80\x04garbage"})
    with pytest.raises(data.DataError, match="test_batch: not a readable CIFAR-10 batch"):
        data.load("cifar10", str(tmp_path / "garbage"))
    folder = _cifar_folder(tmp_path / "archive")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(data.DataError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", str(archive))
    np.savez(tmp_path / "empty.npz", train=np.zeros((0, 4, 4, 1), np.uint8), test=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(data.DataError, match=r"empty.npz\['train'\]: the split holds no images"):
        data.load("npy", str(tmp_path / "empty.npz"))
    np.save(tmp_path / "flat.npy", np.zeros((5, 0, 4, 1), np.uint8))
    with pytest.raises(data.DataError, match="zero-sized images"):
        data.load("npy", str(tmp_path / "flat.npy"))
    for name in ("train_data_batch_1.npz", "val_data.npz"):
        np.savez(tmp_path / name, data=np.zeros((3, 3 * 32 * 32), np.uint8), labels=np.array([1, 2]))
    with pytest.raises(data.DataError, match="3 images need 3 integer labels"):
        data.load("imagenet32", str(tmp_path))
    (tmp_path / "train_data_batch_1.npz").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(data.DataError, match="train_data_batch_1.npz: not a readable npz"):
        data.load("imagenet32", str(tmp_path))


@pytest.fixture(scope="module")
def tiny_stream(trained):
    model, _, _ = load_model(trained)
    images = torch.randint(0, 17, (12, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    chunks = []
    stream = compress.encode(model, images, T=2, chunks=chunks)
    assert 0 in chunks and max(chunks) > 0  # both direct and bits-back chunks are in the stream
    return model, images, stream


def _with_header(stream: bytes, **changes) -> bytes:
    """The stream re-packed with header fields changed, under a valid checksum."""
    import dataclasses

    header, payload = compress._unpack(stream)
    return compress._pack(dataclasses.replace(header, **changes), payload)


@pytest.mark.parametrize("changes", [dict(T=10**12), dict(T=0), dict(shape=(2**31, 1, 8, 8)),
                                     dict(shape=(10**6, 1, 8, 8)), dict(max_chunk=10**6), dict(grid_bits=40),
                                     dict(shape=(2, 3, 8, 8)), dict(vocab_size=1), dict(fingerprint=b"\0" * 4),
                                     dict(digest=b"\0" * 4), dict(max_chunk=1)])
def test_tampered_stream_headers_raise_codec_error(tiny_stream, changes):
    model, _, stream = tiny_stream
    with pytest.raises(compress.CodecError):
        compress.decode(model, _with_header(stream, **changes))


def test_tampered_payloads_never_decode_to_wrong_images(tiny_stream):
    model, images, stream = tiny_stream
    header, payload = compress._unpack(stream)
    body = stream[:-compress._CHECKSUM_BYTES]
    rng = np.random.default_rng(0)
    for _ in range(8):
        damaged = bytearray(body)
        i = int(rng.integers(len(body) - 4 * payload.size, len(body)))
        damaged[i] ^= 1 << int(rng.integers(0, 8))
        try:
            decoded = compress.decode(model, bytes(damaged) + compress._checksum(bytes(damaged)))
        except compress.CodecError:
            continue
        assert torch.equal(decoded, images)
    with pytest.raises(compress.CodecError, match="runs past its end|longer than 63 bits"):
        truncated = stream[:7] + b"\xff" * 9
        compress.decode(model, truncated + compress._checksum(truncated))


def test_encode_refuses_an_npz_or_non_image_file_in_one_line(tmp_path, trained):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    (tmp_path / "text.npy").write_text("not numpy")
    for name in ("a.npz", "text.npy"):
        proc = run_cli("vdm_fast.codec.compress", ["encode", "--ckpt", str(trained), "--input", str(tmp_path / name),
                                             "--output", str(tmp_path / "out.vdmz")])
        assert proc.returncode != 0 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, \
            proc.stderr


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
