"""Image data sets as in-memory tensors: Fashion-MNIST, MNIST (IDX), CIFAR-10 (pickle batches), synthetic.

Every problem a user can cause (missing folder or file, truncated or corrupt file, unknown name) raises
:class:`~smartsplit.errors.SmartSplitError` with one line that names the file and says what to do.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from smartsplit.errors import SmartSplitError

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
SPLITS = ("train", "test")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Per-channel (mean, std) of the training images scaled to [0, 1].
_NORM: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_SYNTHETIC_DEFAULT = {"shape": (1, 28, 28), "num_classes": 10, "train": 60000, "test": 10000}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A labelled image set held in memory: ``x`` float32 N x C x H x W (normalised), ``y`` int64 N."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"Dataset {self.name!r}: x must be N x C x H x W and y length N, "
                             f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one example, (C, H, W)."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, n={len(self)}, shape={self.shape}, num_classes={self.num_classes})"

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Dataset:
        """The examples at ``indices``, in that order."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Dataset(self.name, self.x[idx], self.y[idx], self.num_classes)


def load_dataset(name: str, split: str, root: str | Path | None = None, limit: int | None = None,
                 seed: int = 0) -> Dataset:
    """Load ``split`` ("train" or "test") of data set ``name``; ``limit`` keeps a seeded random subsample."""
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise SmartSplitError(f"unknown data set {name!r}: data.name must be one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise SmartSplitError(f"unknown split {split!r} for data set {name!r}: use 'train' or 'test'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SmartSplitError(f"data.limit must be a positive integer or null, got {limit!r}")
    if key == "synthetic":
        n = _SYNTHETIC_DEFAULT[split]
        return synthetic(_SYNTHETIC_DEFAULT["shape"], _SYNTHETIC_DEFAULT["num_classes"],
                         n if limit is None else min(n, limit), seed, split=split)
    if key == "fashion-mnist":
        folder = _folder(root if root is not None else FASHION_MNIST_ROOT, "Fashion-MNIST", _FMNIST_HINT)
        images, labels = _load_idx_pair(folder, split, "Fashion-MNIST", _FMNIST_HINT)
    elif key == "mnist":
        folder = _folder(_require_root(root, "MNIST", _MNIST_HINT), "MNIST", _MNIST_HINT)
        images, labels = _load_idx_pair(folder, split, "MNIST", _MNIST_HINT)
    else:
        folder = _folder(_require_root(root, "CIFAR-10", _CIFAR_HINT), "CIFAR-10", _CIFAR_HINT)
        images, labels = _load_cifar(folder, split)
    if limit is not None and limit < len(labels):
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
        images, labels = images[keep], labels[keep]
    return Dataset(key, _normalise(images, key), torch.from_numpy(labels.astype(np.int64)), 10)


def synthetic(shape: tuple[int, int, int], num_classes: int, n: int, seed: int, *,
              split: str = "train") -> Dataset:
    """A learnable random data set: one fixed mean image per class (from ``seed``) plus unit Gaussian noise.

    Class means depend only on ``seed``, so "train" and "test" splits of one seed share them while their
    samples differ.
    """
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise SmartSplitError(f"synthetic data shape must be three positive sizes (C, H, W), got {shape!r}")
    if num_classes < 1 or n < 1:
        raise SmartSplitError(f"synthetic data needs num_classes >= 1 and n >= 1, got {num_classes} and {n}")
    if split not in SPLITS:
        raise SmartSplitError(f"unknown split {split!r} for synthetic data: use 'train' or 'test'")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    gen = torch.Generator().manual_seed(int(seed))
    means = torch.randn((num_classes, *shape), generator=gen)
    gen = torch.Generator().manual_seed(int(seed) * 2 + 1 + SPLITS.index(split) * 7919)
    y = torch.arange(n, dtype=torch.int64) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    x = torch.randn((n, *shape), generator=gen)
    for start in range(0, n, _CHUNK):  # each example's class mean added in place, a few thousand at a time: no
        x[start:start + _CHUNK] += means[y[start:start + _CHUNK]]  # temporary the size of a class or of the set
    return Dataset("synthetic", x.float(), y, num_classes)


_CHUNK = 4096


# --------------------------------------------------------------------------- helpers

_FMNIST_HINT = ("install it with `sudo apt-get install dataset-fashion-mnist` or pass data.root "
                "pointing at a folder with the four IDX files")
_MNIST_HINT = ("download the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
               "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into a folder and pass it as data.root")
_CIFAR_HINT = ("download and unpack the CIFAR-10 python version (cifar-10-python.tar.gz) and pass the folder "
               "holding data_batch_1..5 and test_batch (or cifar-10-batches-py/) as data.root")


def _require_root(root: str | Path | None, label: str, hint: str) -> Path:
    if root is None:
        raise SmartSplitError(f"{label} needs a data folder (data.root is not set): {hint}")
    return Path(root)


def _folder(root: str | Path, label: str, hint: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise SmartSplitError(f"{label} not found: {path} {what}: {hint}")
    return path


def _find(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except PermissionError:
        raise SmartSplitError(f"cannot read {path}: permission denied; make the file readable") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise SmartSplitError(f"cannot read {path} ({type(exc).__name__}: {exc}): the file is truncated or "
                              "corrupt; download it again") from None


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array of ``ndim`` dimensions, checked against its header."""
    data = _read_bytes(path)
    bad = f"{path} is not a valid IDX file"
    if len(data) < 4 + 4 * ndim:
        raise SmartSplitError(f"{bad} (only {len(data)} bytes): the file is truncated; download it again")
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise SmartSplitError(f"{bad} (magic {data[:4].hex()}, expected 000008{ndim:02x}): "
                              "the file is corrupt or not the expected one; download it again")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise SmartSplitError(f"{bad} (header {dims} needs {expected} bytes, file has {len(data)}): "
                              "the file is truncated or corrupt; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_pair(folder: Path, split: str, label: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 1 x H x W uint8) and labels (N) of one split from a folder of IDX files."""
    arrays = []
    for stem, ndim in zip(_IDX_STEMS[split], (3, 1)):
        dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
        names = [n + gz for n in (stem, dotted) for gz in (".gz", "")]
        path = _find([folder, folder / "raw"], names)
        if path is None:
            raise SmartSplitError(f"{label} not found in {folder} (missing {stem}[.gz]): {hint}")
        arrays.append((path, _parse_idx(path, ndim)))
    (img_path, images), (lbl_path, labels) = arrays
    if len(images) != len(labels):
        raise SmartSplitError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels: "
                              "the files do not belong together; download both again")
    if labels.size and labels.max() >= 10:
        raise SmartSplitError(f"{lbl_path} holds label {labels.max()} (expected 0-9): "
                              "the file is corrupt or not a label file; download it again")
    return images[:, None], labels


_PICKLE_ALLOWED = {
    ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
    *((f"numpy.{m}.multiarray", n) for m in ("core", "_core") for n in ("_reconstruct", "scalar")),
    *((f"numpy.{m}.numeric", "_frombuffer") for m in ("core", "_core")),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a bad file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _load_cifar(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 3 x 32 x 32 uint8) and labels (N) from the CIFAR-10 python pickle batches."""
    folders = [folder, folder / "cifar-10-batches-py"]
    xs, ys = [], []
    for name in _CIFAR_FILES[split]:
        path = _find(folders, [name])
        if path is None:
            raise SmartSplitError(f"CIFAR-10 not found in {folder} (missing {name}): {_CIFAR_HINT}")
        try:
            with path.open("rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
            data = batch.get(b"data", batch.get("data"))
            labels = batch.get(b"labels", batch.get("labels"))
            data = np.asarray(data, dtype=np.uint8)
            labels = np.asarray(labels, dtype=np.int64)
        except Exception as exc:  # pickle can raise nearly anything on a corrupt file
            raise SmartSplitError(f"cannot read CIFAR-10 batch {path} ({type(exc).__name__}: {exc}): the file "
                                  "is truncated or corrupt; unpack cifar-10-python.tar.gz again") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
            raise SmartSplitError(f"CIFAR-10 batch {path} has data {data.shape} and labels {labels.shape}, "
                                  "expected N x 3072 and N: the file is corrupt; unpack it again")
        if labels.size and (labels.min() < 0 or labels.max() >= 10):
            raise SmartSplitError(f"CIFAR-10 batch {path} holds labels outside 0-9: the file is corrupt; "
                                  "unpack it again")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _normalise(images: np.ndarray, key: str) -> torch.Tensor:
    """uint8 N x C x H x W to float32 scaled to [0, 1] then standardised per channel."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in _NORM[key])
    x = torch.tensor(images).float()  # torch's own (aligned) memory: kernels' results depend on alignment
    return x.div_(255.0).sub_(mean).div_(std)  # in place: one float copy of the data set, not three
