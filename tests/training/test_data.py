"""The datasets (``training/data.py``): the bundled digits, CIFAR-10 from its folder or archive,
ImageNet npz batches and plain arrays; missing, malformed and code-carrying files refused in one
line naming the file."""

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import WritesMarker

from vdm_fast.training import data


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


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _cifar_folder(tmp_path, {"data_batch_3": {b"data": np.zeros((2, 3072), np.uint8), b"labels": WritesMarker(marker)}})
    with pytest.raises(data.DataError, match="data_batch_3.*refused to load pathlib"):
        data.load("cifar10", str(tmp_path))
    assert not marker.exists()
