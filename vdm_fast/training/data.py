"""Datasets of integer images, loaded from local files only (nothing is downloaded).

Every loader returns a ``Dataset``: uint8 images ``[N, C, H, W]`` in ``[0, vocab_size)`` and
int64 labels (or None), for a train and a test split.
"""

import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: Optional[torch.Tensor]  # int64 [N] or None


@dataclass
class Dataset:
    train: Split
    test: Split
    vocab_size: int

    @property
    def image_shape(self):
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for unlabelled data)."""
        if self.train.labels is None:
            return 0
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1


class DataError(ValueError):
    """A dataset is missing or not in the expected form; the message says what and where."""


def _nhwc(a: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N, C, H, W]."""
    return a.transpose(0, 3, 1, 2)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits: 17 intensity levels (0..16), 10 classes.

    A fixed permutation puts 1500 images in train and the other 297 in test.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]
    return Dataset(Split(images[train], labels[train]), Split(images[test], labels[test]), vocab_size=17)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR-10 batches hold: dicts, lists, bytes, numbers and
    numpy arrays. Any other global (the way a crafted pickle runs code) is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only "
                                         "dicts, lists, bytes and numpy arrays")
        return super().find_class(module, name)


def _read_cifar_batch(fh, where: str) -> dict:
    try:
        batch = _CifarUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # refused globals, and truncated or garbage bytes (EOFError, ValueError, ...)
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{where}: a CIFAR-10 batch must be a dict, got {type(batch).__name__}")
    return batch


def _cifar_batches(path: Path):
    """(name, dict) of the python-version CIFAR-10 batches, from the archive or its folder."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if path.is_file():
        try:
            with tarfile.open(path) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DataError(f"{path} lacks the CIFAR-10 batches {missing}")
                return {n: _read_cifar_batch(tar.extractfile(members[n]), f"{path}:{n}") for n in names}
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{path} is not a readable tar archive ({err}); expected cifar-10-python.tar.gz") from err
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} lacks the CIFAR-10 batches {missing}; expected the extracted "
                        "cifar-10-python.tar.gz (folder cifar-10-batches-py) or the archive itself")
    batches = {}
    for n in names:
        with open(folder / n, "rb") as fh:
            batches[n] = _read_cifar_batch(fh, str(folder / n))
    return batches


def _split(images: np.ndarray, labels, where: str) -> Split:
    """A split of uint8 NCHW images and optional labels, checked: not empty, no zero-sized
    image, one label per image."""
    if images.shape[0] == 0:
        raise DataError(f"{where}: the split holds no images")
    if 0 in images.shape[1:]:
        raise DataError(f"{where}: zero-sized images, shape {images.shape[1:]}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
            raise DataError(f"{where}: {images.shape[0]} images but labels of shape {labels.shape} "
                            f"({labels.dtype}); one integer label per image expected")
        if labels.min() < 0:
            raise DataError(f"{where}: negative labels")
        labels = torch.from_numpy(labels.astype(np.int64))
    return Split(torch.from_numpy(np.ascontiguousarray(images)), labels)


def load_cifar10(path: str) -> Dataset:
    """CIFAR-10, python version: ``cifar-10-python.tar.gz`` or its extracted folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"CIFAR-10 not found at {path}: expected cifar-10-python.tar.gz or the "
                        "folder cifar-10-batches-py extracted from it (nothing is downloaded)")
    batches = _cifar_batches(p)

    def split(names):
        data, labels = [], []
        for n in names:
            try:
                d, l = np.asarray(batches[n][b"data"]), np.asarray(batches[n][b"labels"])
            except KeyError as err:
                raise DataError(f"{path}: CIFAR-10 batch {n} lacks {err}") from err
            if d.ndim != 2 or d.shape[1] != 3072 or d.dtype != np.uint8:
                raise DataError(f"{path}: CIFAR-10 batch {n} must hold uint8 data [N, 3072], got {d.dtype} {d.shape}")
            if l.shape != (len(d),):
                raise DataError(f"{path}: CIFAR-10 batch {n} has {len(d)} images but labels of shape {l.shape}")
            data.append(d)
            labels.append(l)
        return _split(np.concatenate(data).reshape(-1, 3, 32, 32), np.concatenate(labels), f"{path} ({names[0]}...)")

    return Dataset(split([f"data_batch_{i}" for i in range(1, 6)]), split(["test_batch"]), vocab_size=256)


def load_imagenet(path: str, size: int) -> Dataset:
    """Downsampled ImageNet ``size``x``size`` (32 or 64) in its npz form: a folder holding
    ``train_data_batch_*.npz`` and ``val_data.npz``, each with ``data`` uint8 ``[N, 3 * size^2]``
    (channel planes) and ``labels`` (1-based)."""
    folder = Path(path)
    train_files = sorted(folder.glob("train_data_batch_*.npz"))
    val_file = folder / "val_data.npz"
    if not folder.is_dir() or not train_files or not val_file.is_file():
        raise DataError(f"ImageNet {size}x{size} not found in {path}: expected a folder with "
                        "train_data_batch_*.npz and val_data.npz (the downsampled npz release)")

    def split(files):
        data, labels = [], []
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as npz:
                    d = npz["data"] if "data" in npz.files else None
                    l = npz["labels"] if "labels" in npz.files else None
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # truncated, or not an npz
                raise DataError(f"{f}: not a readable npz file ({type(err).__name__}: {err})") from err
            if d is None or l is None or d.ndim != 2 or d.shape[1] != 3 * size * size or d.dtype != np.uint8:
                raise DataError(f"{f}: expected uint8 'data' of shape [N, {3 * size * size}] and 'labels' [N]")
            if l.shape != (len(d),) or l.dtype.kind not in "iu" or (len(l) and l.min() < 1):
                raise DataError(f"{f}: {len(d)} images need {len(d)} integer labels from 1, got {l.dtype} {l.shape}")
            data.append(d)
            labels.append(l.astype(np.int64) - 1)
        return _split(np.concatenate(data).reshape(-1, 3, size, size), np.concatenate(labels), str(files[0]))

    return Dataset(split(train_files), split([val_file]), vocab_size=256)


def load_array(path: str) -> Dataset:
    """Any ``.npy``/``.npz`` of uint8 images ``[N, H, W, C]``. An npz may hold ``train`` and
    ``test`` arrays; otherwise its one array (or the ``.npy``) is split 90/10 by a fixed
    permutation."""
    p = Path(path)
    if not p.is_file() or p.suffix not in (".npy", ".npz"):
        raise DataError(f"expected a .npy or .npz file of uint8 images [N, H, W, C] at {path}")
    try:
        if p.suffix == ".npy":
            arrays = {"images": np.load(p, allow_pickle=False)}
        else:
            with np.load(p, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} could not be read as numpy data ({type(err).__name__}: {err})") from err
    for name, a in arrays.items():
        if a.dtype != np.uint8 or a.ndim != 4:
            raise DataError(f"{path}: array {name!r} must be uint8 [N, H, W, C], got {a.dtype} {a.shape}")
        # Channels are the last axis, and images have 1 to 4 of them: an NCHW array such as
        # (20, 1, 8, 8) would otherwise be read as 1x8 images of 8 channels.
        if not 1 <= a.shape[3] <= 4:
            raise DataError(f"{path}: array {name!r} of shape {a.shape} is read as [N, H, W, C] with C = "
                            f"{a.shape[3]} channels; 1 to 4 expected (an NCHW array needs "
                            "a.transpose(0, 2, 3, 1) first)")
    if "train" in arrays and "test" in arrays:
        return Dataset(_split(_nhwc(arrays["train"]), None, f"{path}['train']"),
                       _split(_nhwc(arrays["test"]), None, f"{path}['test']"), 256)
    if len(arrays) != 1:
        raise DataError(f"{path}: expected one array, or 'train' and 'test', got {sorted(arrays)}")
    images = _nhwc(next(iter(arrays.values())))
    if len(images) < 2:
        raise DataError(f"{path}: needs at least 2 images for a train/test split, got {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).numpy()
    n_test = max(1, len(images) // 10)
    return Dataset(_split(images[order[n_test:]], None, path), _split(images[order[:n_test]], None, path), 256)


def load(name: str, data_dir: str = "") -> Dataset:
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name in ("imagenet32", "imagenet64"):
        return load_imagenet(data_dir, int(name[-2:]))
    if name == "npy":
        return load_array(data_dir)
    raise DataError(f"unknown dataset {name!r}; expected digits, cifar10, imagenet32, imagenet64 or npy")


def histogram_bpd(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Bits per dim of ``test`` under independent per-pixel histograms fitted on ``train``
    (add-one smoothing): the baseline a model must beat to have learned anything."""
    flat_train = train.reshape(len(train), -1).long()
    counts = torch.ones(flat_train.shape[1], vocab_size, dtype=torch.float64)
    counts.scatter_add_(1, flat_train.T.contiguous(), torch.ones_like(flat_train.T, dtype=torch.float64))
    logp = torch.log2(counts / counts.sum(1, keepdim=True))
    flat_test = test.reshape(len(test), -1).long()
    return -logp.gather(1, flat_test.T.contiguous()).mean().item()
