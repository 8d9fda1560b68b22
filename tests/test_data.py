"""Data loading (IDX, CIFAR pickles, synthetic) and client partitioners."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from smartsplit.data import (
    FASHION_MNIST_ROOT,
    Dataset,
    dirichlet,
    iid,
    label_skew,
    load_dataset,
    partition,
    shards,
    synthetic,
)
from smartsplit.errors import SmartSplitError

# --------------------------------------------------------------------------- fixtures


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    prefix = "train" if split == "train" else "t10k"
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


def fake_images(n: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


@pytest.fixture()
def idx_folder(tmp_path: Path) -> Path:
    for split, n in (("train", 30), ("test", 20)):
        write_idx(tmp_path, split, *fake_images(n, seed=n), gz=True)
    return tmp_path


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_round_trip(tmp_path: Path, gz: bool, name: str) -> None:
    images, labels = fake_images(12)
    write_idx(tmp_path, "test", images, labels, gz=gz)
    ds = load_dataset(name, "test", root=tmp_path)
    assert isinstance(ds, Dataset) and len(ds) == 12 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
    # normalisation is an affine map of the raw pixels
    raw = torch.from_numpy(images.astype(np.float32))[:, None] / 255
    slope, intercept = np.polyfit(raw.flatten().numpy().astype(np.float64), ds.x.flatten().numpy(), 1)
    assert slope > 1 and intercept < 0
    assert torch.allclose(ds.x, raw * float(slope) + float(intercept), atol=1e-4)


def test_limit_is_seeded_subsample(idx_folder: Path) -> None:
    full = load_dataset("mnist", "train", root=idx_folder)
    a = load_dataset("mnist", "train", root=idx_folder, limit=10, seed=1)
    b = load_dataset("mnist", "train", root=idx_folder, limit=10, seed=1)
    c = load_dataset("mnist", "train", root=idx_folder, limit=10, seed=2)
    assert len(a) == 10 and torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert len(load_dataset("mnist", "train", root=idx_folder, limit=1000)) == len(full) == 30
    # every kept row is a row of the full set
    assert all((full.x == row).flatten(1).all(1).any() for row in a.x)


def test_subset(idx_folder: Path) -> None:
    ds = load_dataset("mnist", "train", root=idx_folder)
    sub = ds.subset(np.array([3, 1]))
    assert len(sub) == 2 and torch.equal(sub.x[0], ds.x[3]) and torch.equal(sub.y, ds.y[[3, 1]])
    assert "n=2" in repr(sub)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(SmartSplitError, match="does not exist"):
        load_dataset("fashion-mnist", "train", root=tmp_path / "nope")
    with pytest.raises(SmartSplitError, match=r"missing train-images-idx3-ubyte\[\.gz\].*apt-get install"):
        load_dataset("fashion-mnist", "train", root=tmp_path)
    with pytest.raises(SmartSplitError, match="data.root"):
        load_dataset("mnist", "train")
    with pytest.raises(SmartSplitError, match="data.root"):
        load_dataset("cifar10", "train")


def test_missing_label_file(idx_folder: Path) -> None:
    (idx_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SmartSplitError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", root=idx_folder)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: gzip.compress(d)[:-20], "truncated or corrupt"),  # truncated gzip stream
        (lambda d: b"\x1f\x8bnot gzip at all", "truncated or corrupt"),  # bad gzip header
        (lambda d: d[:-5], "truncated"),  # raw file cut short
        (lambda d: b"\x00\x00\x0d\x03" + d[4:], "magic"),  # wrong magic (float data)
        (lambda d: b"\x00\x00\x08\x02" + d[4:], "magic"),  # wrong number of dimensions
        (lambda d: b"ab", "truncated"),
    ],
)
def test_corrupt_file(idx_folder: Path, corrupt, match: str) -> None:
    path = idx_folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(corrupt(gzip.decompress(path.read_bytes())))
    with pytest.raises(SmartSplitError, match=match) as err:
        load_dataset("fashion-mnist", "test", root=idx_folder)
    assert "t10k-images-idx3-ubyte" in str(err.value) and "\n" not in str(err.value)


def test_count_mismatch(tmp_path: Path) -> None:
    images, labels = fake_images(10)
    write_idx(tmp_path, "test", images, labels[:7], gz=False)
    with pytest.raises(SmartSplitError, match="10 images.*7 labels"):
        load_dataset("mnist", "test", root=tmp_path)


def test_bad_names(idx_folder: Path) -> None:
    with pytest.raises(SmartSplitError, match="unknown data set 'imagenet'"):
        load_dataset("imagenet", "train")
    with pytest.raises(SmartSplitError, match="split"):
        load_dataset("mnist", "validation", root=idx_folder)
    with pytest.raises(SmartSplitError, match="limit"):
        load_dataset("mnist", "train", root=idx_folder, limit=0)


# --------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    raw = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=2)
        raw[name] = data
    return raw


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_round_trip(tmp_path: Path, nested: bool) -> None:
    raw = write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(train) == 20 and len(test) == 4 and train.shape == (3, 32, 32) and train.num_classes == 10
    assert test.y.tolist() == [5, 6, 7, 8]
    pixels = torch.from_numpy(raw["test_batch"].reshape(-1, 3, 32, 32).astype(np.float32)) / 255
    # channel 0 uses its own mean/std: an increasing affine map of the raw pixels
    order = torch.argsort(pixels[:, 0].flatten())
    assert bool((torch.diff(test.x[:, 0].flatten()[order]) >= -1e-6).all())


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(SmartSplitError, match="missing data_batch_3"):
        load_dataset("cifar10", "train", root=tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(SmartSplitError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_cifar_refuses_code_in_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Path("x")}))
    with pytest.raises(SmartSplitError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shape_and_determinism() -> None:
    a = synthetic((3, 8, 8), 5, 50, seed=3)
    b = synthetic((3, 8, 8), 5, 50, seed=3)
    c = synthetic((3, 8, 8), 5, 50, seed=4)
    assert a.shape == (3, 8, 8) and len(a) == 50 and a.num_classes == 5 and a.x.dtype == torch.float32
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert sorted(a.y.unique().tolist()) == [0, 1, 2, 3, 4]


def test_synthetic_is_learnable_across_splits() -> None:
    train = synthetic((1, 6, 6), 4, 400, seed=0)
    test = synthetic((1, 6, 6), 4, 200, seed=0, split="test")
    assert not torch.equal(train.x[:200], test.x)
    means = torch.stack([train.x[train.y == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(test.x.flatten(1), means).argmin(1)
    assert (pred == test.y).float().mean() > 0.9


def test_load_synthetic() -> None:
    ds = load_dataset("synthetic", "test", limit=64)
    assert len(ds) == 64 and ds.shape == (1, 28, 28) and ds.num_classes == 10


# --------------------------------------------------------------------------- partitioners

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def assert_valid(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat)) and flat.min() >= 0 and flat.max() < n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_covers_and_is_disjoint(scheme: str) -> None:
    parts = partition(LABELS, 7, scheme, seed=1)
    assert_valid(parts, len(LABELS), 7)
    assert sum(len(p) for p in parts) == len(LABELS)


def test_iid_balanced() -> None:
    parts = iid(LABELS, 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(parts, LABELS, 10) < 0.15


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    skew = [label_skew(dirichlet(LABELS, 10, a, seed=0), LABELS, 10) for a in (100.0, 1.0, 0.1)]
    assert skew[0] < skew[1] < skew[2]
    assert skew[0] < 0.15 and skew[2] > 0.5


def test_dirichlet_min_size() -> None:
    parts = dirichlet(LABELS, 50, 0.05, seed=0, min_size=10)
    assert_valid(parts, len(LABELS), 50)
    assert min(len(p) for p in parts) >= 10 and sum(len(p) for p in parts) == len(LABELS)


def test_shards_skew() -> None:
    parts = shards(LABELS, 10, 1, seed=0)
    assert label_skew(parts, LABELS, 10) == pytest.approx(0.9)  # one class per client
    assert 0.5 < label_skew(shards(LABELS, 10, 2, seed=0), LABELS, 10) < 0.9
    assert label_skew([np.arange(len(LABELS))], LABELS, 10) == 0.0


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_seed_reproduces(scheme: str) -> None:
    a, b = partition(LABELS, 5, scheme, seed=7), partition(LABELS, 5, scheme, seed=7)
    c = partition(LABELS, 5, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_accepts_torch_labels() -> None:
    parts = partition(torch.from_numpy(LABELS), 4, "dirichlet", alpha=0.3)
    assert_valid(parts, len(LABELS), 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "random"}, "scheme"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"scheme": "dirichlet", "min_size": 201}, "min_size"),
        ({"scheme": "shards", "shards_per_client": 0}, "shards_per_client"),
        ({"scheme": "shards", "shards_per_client": 300}, "shards_per_client"),
        ({"scheme": "iid", "num_clients": 1001}, "num_clients"),
        ({"scheme": "iid", "num_clients": 0}, "num_clients"),
    ],
)
def test_bad_partition_args(kwargs: dict, match: str) -> None:
    kwargs = {"num_clients": 5, **kwargs}
    with pytest.raises(SmartSplitError, match=match):
        partition(LABELS, kwargs.pop("num_clients"), kwargs.pop("scheme"), **kwargs)
    with pytest.raises(SmartSplitError, match="labels"):
        iid(np.zeros((3, 2), dtype=np.int64), 2, seed=0)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 10000 and ds.num_classes == 10 and ds.shape == (1, 28, 28)
    assert sorted(ds.y.unique().tolist()) == list(range(10))
    assert abs(ds.x.mean().item()) < 0.1 and abs(ds.x.std().item() - 1) < 0.1


def test_shards_hold_every_client_in_one_array_and_hand_out_views() -> None:
    from smartsplit.data import Shards, label_counts

    parts = dirichlet(LABELS, 12, 0.3, seed=4) + [np.zeros(0, dtype=np.int64)]
    packed = Shards(parts)
    assert len(packed) == 13 and [p.tolist() for p in packed] == [p.tolist() for p in parts]
    assert packed.sizes.tolist() == [len(p) for p in parts] and packed[-1].tolist() == []
    assert packed[3].base is packed.indices  # a view, not a copy
    counts = label_counts(LABELS, packed, 10)
    assert counts.tolist() == [np.bincount(LABELS[p], minlength=10).tolist() for p in parts]
    assert label_counts(LABELS, parts, 10).tolist() == counts.tolist()
