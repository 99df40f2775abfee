"""Shareable weights: ``vdm-fast export`` writes a checkpoint's EMA weights as
``model.safetensors`` + ``config.json``; ``load_pretrained`` and the CLIs' ``--ckpt FOLDER``
read them back exactly, without unpickling anything, and refuse a damaged or foreign folder by
name."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
import safetensors.torch as st  # noqa: E402

from vdm_fast import extras, config  # noqa: E402
from vdm_fast.io import checkpoint, load_model, pretrained
from vdm_fast.training import export as export_cli
from vdm_fast.factory import build_model  # noqa: E402
from vdm_fast.nn import VDM  # noqa: E402

SHAPE, VOCAB = (1, 8, 8), 17  # the bundled digits
VARIANTS = {
    "default": ({}, 0),
    "other_settings": (dict(prediction="v", weighting="sigmoid", sigmoid_bias=1.5, schedule="fixed", attention="all",
                            antithetic=False, dropout=0.2, gamma_min=-6.0, gamma_max=4.0, T=4), 0),
    "nnet_variance_conditional": (dict(schedule="nnet", schedule_objective="variance", conditional=True,
                                       label_dropout=0.2, guidance=1.0), 10),
}


def make_checkpoint(path: Path, overrides=None, num_classes=0, seed=0) -> Path:
    """A checkpoint like the trainer's, of a tiny digits model moved off its initialisation,
    with EMA weights that differ from the raw model's."""
    cfg = config.resolve(dict(data="digits", n_embd=32, n_layer=1, **(overrides or {})))
    model = build_model(cfg, SHAPE, VOCAB, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ema = {n: (p + 0.02 * torch.randn(p.shape, generator=g)).detach() for n, p in model.named_parameters()}
    checkpoint.save(path, {"config": config.to_dict(cfg), "step": 7, "model": model.state_dict(), "ema": ema,
                           "image_shape": list(SHAPE), "vocab_size": VOCAB, "num_classes": num_classes})
    return path


def outputs(model, labels=None):
    """What a model computes, with fixed generators: per-image bound terms and a sample."""
    model.eval()
    x = torch.randint(0, VOCAB, (3, *SHAPE), generator=torch.Generator().manual_seed(1))
    y = None if labels is None else labels[:3]
    out = model(x, generator=torch.Generator().manual_seed(2), labels=y)
    sample = model.sample(4, 3, generator=torch.Generator().manual_seed(3), labels=labels,
                          guidance=0.5 if labels is not None else 0.0)
    return [out.bpd, out.reconstruction, out.prior, out.diffusion, sample]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, folder) of the default tiny model, the folder written by save_pretrained."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "checkpoint.pt")
    model, cfg, state = load_model(ckpt)
    pretrained.save_pretrained(model, cfg, root / "pretrained", step=state["step"])
    return ckpt, root / "pretrained"


@pytest.fixture
def folder(exported, tmp_path):
    """A private copy of the exported folder, to damage."""
    return Path(shutil.copytree(exported[1], tmp_path / "copy"))


def rewrite_config(folder: Path, reseal_config=True, drop=(), **changes) -> None:
    """Change config.json's entries, and (``reseal_config``) its own checksum with them, so that
    what is refused is the change itself."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    for key in drop:
        del cfg[key]
    if reseal_config:
        cfg["config_sha256"] = pretrained.config_digest(cfg)
    path.write_text(json.dumps(cfg))


def reseal(folder: Path) -> None:
    """Make config.json's checksum that of the present model.safetensors, so that what is
    refused is the file itself, not the checksum."""
    import hashlib

    rewrite_config(folder, safetensors_sha256=hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest())


def read_tensors(folder: Path) -> dict:
    """The tensors of model.safetensors, copied into memory (``load_file`` maps the file, and
    rewriting a mapped file under its tensors is a bus error)."""
    return st.load((folder / "model.safetensors").read_bytes())


def resave(folder: Path, mutate) -> None:
    """Re-save model.safetensors with ``mutate(tensors)`` applied (a consistent, resealed file)."""
    tensors = read_tensors(folder)
    mutate(tensors)
    st.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    reseal(folder)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_folder_computes_exactly_what_the_checkpoints_ema_model_does(tmp_path, variant):
    overrides, num_classes = VARIANTS[variant]
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", overrides, num_classes)
    ema_model, cfg, state = load_model(ckpt)
    raw_model, _, _ = load_model(ckpt, use_ema=False)
    written = pretrained.save_pretrained(ema_model, cfg, tmp_path / "out", step=state["step"])
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]  # no temporaries left

    loaded = pretrained.load_pretrained(tmp_path / "out")[0]
    assert type(loaded) is VDM and not loaded.training
    labels = torch.arange(4) % num_classes if num_classes else None
    for got, want in zip(outputs(loaded, labels), outputs(ema_model, labels)):
        assert torch.equal(got, want)
    assert not torch.equal(outputs(loaded, labels)[0], outputs(raw_model, labels)[0])  # the EMA, not the raw weights

    model, cfg2, info = pretrained.load_pretrained(tmp_path / "out")
    for name in pretrained.MODEL_CONFIG_FIELDS:
        assert getattr(cfg2, name) == getattr(cfg, name), name
    assert info["step"] == 7 and info["weights"] == "ema" and info["num_classes"] == num_classes
    on_disk = json.loads((tmp_path / "out" / "config.json").read_text())
    assert on_disk == written
    assert on_disk["vdm_fast_format"] == "vdm_fast.pretrained/1" and on_disk["image_shape"] == [1, 8, 8]
    assert on_disk["vocab_size"] == VOCAB and on_disk["vdm_fast_version"]
    assert "data_dir" not in on_disk and "out_dir" not in on_disk  # no local paths in a shared file


def test_local_paths_stay_home_and_evaluate_asks_for_the_data(tmp_path):
    from vdm_fast.training import evaluate

    cfg = config.resolve(dict(data="npy", data_dir=str(tmp_path / "my_private_data.npy"), n_embd=32, n_layer=0))
    pretrained.save_pretrained(build_model(cfg, SHAPE, VOCAB), cfg, tmp_path / "out")
    assert "my_private_data" not in (tmp_path / "out" / "config.json").read_text()
    _, loaded, _ = pretrained.load_pretrained(tmp_path / "out")
    assert loaded.data == "npy" and loaded.data_dir == pretrained.UNRECORDED_DATA_DIR
    with pytest.raises(SystemExit, match="pass --data-dir"):
        evaluate.main(["--ckpt", str(tmp_path / "out"), "--device", "cpu"])


def test_the_folder_is_standard_safetensors_and_json(exported):
    _, folder = exported
    tensors = st.load_file(str(folder / "model.safetensors"))  # any safetensors reader opens it
    ema = checkpoint.load(exported[0])["ema"]
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["format"] == "pt"


def test_loading_never_unpickles(exported, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a pretrained folder was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    pretrained.load_pretrained(exported[1])[0]


def test_nn_imports_neither_the_exporter_nor_safetensors():
    script = ("import sys, vdm_fast.nn; "
              "print([m for m in ('vdm_fast.io.pretrained', 'vdm_fast.io.checkpoint', 'safetensors') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ CLIs


def test_the_export_cli(exported, tmp_path):
    ckpt, _ = exported
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "vdm_fast.training.export", "--ckpt", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in proc.stdout and "config.json" in proc.stdout and "step 7" in proc.stdout
    assert (out / "model.safetensors").read_bytes() == (exported[1] / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((exported[1] / "config.json").read_text())

    # A non-empty folder is refused without --force; --force replaces the two files only.
    (out / "README.md").write_text("a model card\n")
    with pytest.raises(SystemExit, match="not empty.*--force"):
        export_cli.main(["--ckpt", str(ckpt), "--out", str(out), "--weights", "model"])
    export_cli.main(["--ckpt", str(ckpt), "--out", str(out), "--weights", "model", "--force"])
    assert (out / "README.md").exists() and json.loads((out / "config.json").read_text())["weights"] == "model"
    raw, _, _ = load_model(ckpt, use_ema=False)
    assert torch.equal(outputs(pretrained.load_pretrained(out)[0])[0], outputs(raw)[0])
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]

    # A training run's folder is neither written into nor read as an exported one.
    with pytest.raises(SystemExit, match="training run's folder"):
        export_cli.main(["--ckpt", str(ckpt), "--out", str(ckpt.parent), "--force"])
    with pytest.raises(checkpoint.CheckpointError, match="training run's folder.*checkpoint.pt"):
        load_model(ckpt.parent)
    with pytest.raises(SystemExit, match="no checkpoint at"):
        export_cli.main(["--ckpt", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "o")])


def test_evaluate_sample_and_compress_take_the_folder(exported, tmp_path, capsys):
    from vdm_fast.training import evaluate, sample

    ckpt, folder = exported
    report = []
    for source in (ckpt, folder):
        evaluate.main(["--ckpt", str(source), "--batches", "1", "--device", "cpu"])
        report.append(capsys.readouterr().out)
    same = [re.sub(r"; [0-9.]+ s\]", "]", text) for text in report]  # all but the wall time
    assert same[0] == same[1] and report[0].startswith("step 7: test bpd")

    for name, source in (("ckpt.png", ckpt), ("folder.png", folder)):
        sample.main(["--ckpt", str(source), "--n", "4", "--T", "3", "--out", str(tmp_path / name), "--device", "cpu"])
    assert (tmp_path / "ckpt.png").read_bytes() == (tmp_path / "folder.png").read_bytes()

    pytest.importorskip("constriction")
    import numpy as np

    from vdm_fast.codec import compress

    np.save(tmp_path / "in.npy", np.random.default_rng(0).integers(0, VOCAB, (2, 8, 8, 1), dtype=np.uint8))
    streams = []
    for i, source in enumerate((ckpt, folder)):
        compress.main(["encode", "--ckpt", str(source), "--input", str(tmp_path / "in.npy"),
                       "--output", str(tmp_path / f"{i}.vdmz"), "--T", "2"])
        streams.append((tmp_path / f"{i}.vdmz").read_bytes())
    assert streams[0] == streams[1]  # the same model, to the fingerprint of its weights


def test_the_clis_refuse_a_damaged_folder_by_name(folder, tmp_path):
    from vdm_fast.codec import compress
    from vdm_fast.training import sample

    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="error: .*model.safetensors is damaged.*SHA-256"):
        sample.main(["--ckpt", str(folder), "--n", "1", "--T", "1", "--out", str(tmp_path / "s.png")])
    with pytest.raises(SystemExit, match="model.safetensors is damaged"):
        compress.main(["encode", "--ckpt", str(folder), "--input", "x.npy", "--output", str(tmp_path / "o")])


# ------------------------------------------------------------------------------------- refusals


def refused(folder: Path, pattern: str):
    with pytest.raises(pretrained.PretrainedError, match=pattern):
        pretrained.load_pretrained(folder)[0]


def test_a_truncated_file_is_refused(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    refused(folder, r"model.safetensors is truncated: its header describes \d+ bytes of tensor data")
    path.write_bytes(data[:20])  # cut inside the header
    refused(folder, "model.safetensors is not a safetensors file, or is truncated")
    path.write_bytes(b"")
    refused(folder, "model.safetensors is not a safetensors file, or is truncated .only 0 bytes")
    path.write_bytes(data + b"\0")
    refused(folder, "model.safetensors is damaged: 1 bytes follow")


@pytest.mark.parametrize("where", [-1, 0.5])
def test_one_flipped_byte_is_refused_by_the_checksum(folder, where):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[int(where * len(data)) if where > 0 else where] ^= 0x01
    path.write_bytes(bytes(data))
    refused(folder, r"model.safetensors is damaged or was replaced: its SHA-256 does not match .*config.json")


def test_missing_files_are_named(folder, tmp_path):
    refused(tmp_path / "nowhere", "no pretrained folder at")
    (folder / "config.json").unlink()
    refused(folder, "config.json is missing")


def test_a_missing_weights_file_is_named(folder):
    (folder / "model.safetensors").unlink()
    refused(folder, "model.safetensors is missing")


@pytest.mark.parametrize("change, pattern", [
    (dict(vdm_fast_format="vdm_fast.pretrained/999"), r"config.json has format tag 'vdm_fast.pretrained/999'"),
    (dict(drop=["vdm_fast_format"]), "config.json is not a vdm_fast pretrained config"),
    (dict(n_embd="32"), "config.json is invalid: n_embd must be int"),
    (dict(n_embd=33), "config.json is invalid: n_embd must be a multiple of 32"),
    (dict(prediction="noise"), "config.json is invalid: prediction must be one of"),
    (dict(image_shape=[8, 8]), r"config.json is invalid: image_shape \[8, 8\]"),
    (dict(vocab_size=1), "config.json is invalid: vocab_size"),
    (dict(safetensors_sha256="0" * 10), "config.json is invalid: safetensors_sha256"),
    (dict(surprise=1), r"config.json is invalid: unknown entries \['surprise'\]"),
    (dict(weights="best"), "config.json is invalid: weights must be one of"),
    (dict(drop=["n_layer"]), r"config.json is invalid: .*missing entries \['n_layer'\]"),
    (dict(drop=["config_sha256"], reseal_config=False), "config.json is damaged or was edited"),
    (dict(gamma_min=-6.5, reseal_config=False), "config.json is damaged or was edited: .* config_sha256"),
])
def test_an_invalid_config_is_refused_by_name(folder, change, pattern):
    rewrite_config(folder, **change)
    refused(folder, pattern)


def test_a_nan_in_config_json_is_refused(folder):
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"gamma_min": -7.0', '"gamma_min": NaN'))
    refused(folder, "config.json is not valid JSON .*NaN is not a JSON number")


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9])
def test_a_flipped_bit_in_config_json_is_refused(folder, where):
    data = bytearray((folder / "config.json").read_bytes())
    i = int(where * len(data))
    while not chr(data[i]).isdigit():  # a digit flipped to another: still valid JSON
        i += 1
    data[i] = ord("0") + (data[i] - ord("0") + 1) % 10
    (folder / "config.json").write_bytes(bytes(data))
    refused(folder, "config.json")


def test_a_config_that_is_not_json_is_refused(folder):
    (folder / "config.json").write_text("{not json")
    refused(folder, "config.json is not valid JSON")
    (folder / "config.json").write_text("[1, 2]")
    refused(folder, "config.json is invalid: a JSON object expected")


def test_tensors_removed_renamed_reshaped_retyped_or_non_finite_are_refused(folder):
    name = sorted(read_tensors(folder))[3]
    esc = re.escape(name)
    original = (folder / "model.safetensors").read_bytes(), (folder / "config.json").read_text()

    def restore():
        (folder / "model.safetensors").write_bytes(original[0])
        (folder / "config.json").write_text(original[1])

    resave(folder, lambda t: t.pop(name))
    refused(folder, rf"missing tensors \['{esc}'\], unexpected tensors \[\]")
    restore()
    resave(folder, lambda t: t.update({name + "_renamed": t.pop(name)}))
    refused(folder, rf"missing tensors \['{esc}'\], unexpected tensors \['{esc}_renamed'\]")
    restore()
    resave(folder, lambda t: t.update({name: torch.zeros(*t[name].shape, 2)}))
    refused(folder, rf"tensor {esc} has shape .* needs")
    restore()
    resave(folder, lambda t: t.update({name: t[name].double()}))
    refused(folder, rf"tensor {esc} has dtype torch.float64, .* needs torch.float32")
    restore()

    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")

    resave(folder, poison)
    refused(folder, rf"tensor {esc} holds non-finite values")
    restore()
    pretrained.load_pretrained(folder)[0]  # restored: loads again


def test_a_config_for_another_model_is_refused_by_the_tensors(folder):
    rewrite_config(folder, n_embd=64)
    refused(folder, "model.safetensors: tensor .* has shape .* needs")


class _Payload:
    """What a crafted pickle carries: unpickling it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_named_model_safetensors_is_refused_never_unpickled(folder, tmp_path, writer):
    marker = tmp_path / "the_pickle_ran"
    state = {"weights": read_tensors(folder), "payload": _Payload(marker)}
    with open(folder / "model.safetensors", "wb") as fh:
        if writer == "torch.save":
            torch.save(state, fh)
        else:
            pickle.dump(state, fh, protocol=4)
    reseal(folder)  # even with a matching checksum
    refused(folder, "model.safetensors is not a safetensors file: it is a pickle or torch.save file.*never unpickles")
    assert not marker.exists()


# -------------------------------------------------------------------------------------- writing


def test_save_pretrained_refuses_what_would_not_load(exported, tmp_path):
    ckpt, _ = exported
    model, cfg, _ = load_model(ckpt)
    other = config.resolve(dict(data="digits", n_embd=64, n_layer=1))
    with pytest.raises(pretrained.PretrainedError, match=r"weight .* is torch.float32 \(.*\), but the config builds"):
        pretrained.save_pretrained(model, other, tmp_path / "a")
    with pytest.raises(pretrained.PretrainedError, match="prediction='eps' but its config builds prediction='v'"):
        pretrained.save_pretrained(model, config.resolve(dict(data="digits", n_embd=32, n_layer=1, prediction="v")),
                               tmp_path / "a")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(pretrained.PretrainedError, match="non-finite"):
        pretrained.save_pretrained(model, cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(pretrained.PretrainedError, match="is not a folder"):
        pretrained.save_pretrained(model, cfg, tmp_path / "file")


def test_a_failed_write_leaves_no_temporaries(exported, tmp_path, monkeypatch):
    model, cfg, _ = load_model(exported[0])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pretrained.save_pretrained(model, cfg, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_an_ema_folder_does_not_pass_for_raw_weights(exported):
    with pytest.raises(checkpoint.CheckpointError, match="holds only the EMA weights"):
        load_model(exported[1], use_ema=False)


# --------------------------------------------------------------------------------- missing extra


def test_without_safetensors_each_entry_names_the_pip_install(exported, tmp_path, monkeypatch):
    from vdm_fast.training import sample

    ckpt, folder = exported
    monkeypatch.setitem(extras.EXTRAS, "export", ("no_such_module_for_the_test",))
    message = r"missing: no_such_module_for_the_test.*pip install 'vdm_fast\[export\]'"
    with pytest.raises(SystemExit, match="error: .*" + message):
        export_cli.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    with pytest.raises(ImportError, match=message):
        pretrained.load_pretrained(folder)[0]
    with pytest.raises(extras.MissingExtra, match=message):
        pretrained.save_pretrained(*load_model(ckpt)[:2], tmp_path / "out")
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ckpt", str(folder), "--out", str(tmp_path / "s.png")])
    assert not (tmp_path / "out").exists()
    load_model(ckpt)  # a checkpoint file needs no safetensors
