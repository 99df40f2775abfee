"""Training checkpoints (``io/checkpoint.py``): loading one never runs code, a non-finite state
is never written, a damaged file never loads changed weights, and wrong contents are refused by
name, by the loader and by the commands that read checkpoints."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, WritesMarker, run_cli

from vdm_fast.io import checkpoint as ckpt
from vdm_fast.io import load_model
from vdm_fast.io.checkpoint import CheckpointError


def _resume_from(tmp_path, checkpoint: Path):
    """``train --resume`` of a run folder whose checkpoint is ``checkpoint`` (moved there)."""
    out = tmp_path / "run"
    out.mkdir()
    checkpoint.replace(out / "checkpoint.pt")
    return run_cli("vdm_fast.training.train", ["--out-dir", str(out), "--resume", "--steps", "6", *TINY])


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_ckpt):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "config": WritesMarker(marker)}, evil)
    with pytest.raises(CheckpointError, match="could run code"):
        ckpt.load(evil)
    for module, args in (("vdm_fast.training.evaluate", ["--ckpt", str(evil)]),
                         ("vdm_fast.training.sample", ["--ckpt", str(evil), "--out", str(tmp_path / "s.png")])):
        proc = run_cli(module, args)
        assert proc.returncode != 0 and "could run code" in proc.stderr, proc.stderr
    proc = _resume_from(tmp_path, evil)
    assert proc.returncode != 0 and "could run code" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_a_non_finite_state_is_never_written(tmp_path, tiny_ckpt):
    state = ckpt.load(tiny_ckpt)
    first = next(iter(state["ema"]))
    state["ema"][first] = state["ema"][first].clone().fill_(float("nan"))
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(CheckpointError, match=f"ema.{first} holds non-finite"):
        ckpt.save(target, {k: v for k, v in state.items() if k not in ("format", "sha256")})
    assert target.read_bytes() == b"the previous checkpoint"


def test_bit_flips_never_load_changed_weights(tmp_path, tiny_ckpt):
    original = ckpt.load(tiny_ckpt)
    blob = bytearray(tiny_ckpt.read_bytes())
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


def test_checkpoints_with_the_wrong_content_are_refused_by_name(tmp_path, tiny_ckpt):
    state = ckpt.load(tiny_ckpt)
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
