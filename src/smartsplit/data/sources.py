"""The training and test sets a config names: a built-in data set or your own (a plug-in), subsampled and padded.

``data.dataset`` is a built-in name (:data:`~smartsplit.data.datasets.DATASETS`) or ``"package.module:factory"``.
A plug-in factory is called with, by name, those of these arguments its signature accepts (all of them if it takes
``**kwargs``); any other parameter needs a default:

``root``
    ``data.root`` (offered only when set),
``seed``
    the run's seed,
``train_limit``, ``test_limit``
    ``data.train_limit`` / ``data.test_limit`` (offered only when set): a factory may use them to load less;
    SmartSplit keeps at most that many examples anyway (see below).

It returns one of:

* ``(x_train, y_train, x_test, y_test)``: images as float tensors ``N x C x H x W`` (any float dtype; kept as
  float32) and labels as integer tensors of length ``N`` (any integer dtype; kept as int64). Numpy arrays are
  accepted too;
* ``(train, test)``: two map-style ``torch.utils.data.Dataset`` s (``len()`` and indexing) whose items are
  ``(image, label)`` pairs: a float ``C x H x W`` image tensor and an int label (or a 0-d integer tensor);
* a mapping with the keys ``x_train, y_train, x_test, y_test`` or ``train, test``, holding the same, and
  optionally ``num_classes``.

The number of classes is the mapping's ``num_classes`` when given, else the largest label read plus one (from
the data returned; for ``Dataset`` s, from the items read, which are only the kept ones when a limit applies:
return ``num_classes`` when a subsample might miss the top class). Images must be finite, of one shape ``C x H x W``
in both splits, and square after padding; labels must lie in ``0 .. num_classes - 1`` and ``num_classes`` be at
least 2. Problems raise :class:`~smartsplit.errors.SmartSplitError` naming ``data.dataset``.

Then, as for the built-ins: a split longer than its limit keeps a seeded random subsample (the run's seed, the
examples in their original order), and ``data.pad_to`` centres every image on a square canvas of its
background (lowest) value. The plug-in's data are used as returned otherwise: no normalisation is applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from smartsplit.data.datasets import Dataset, load_dataset, synthetic
from smartsplit.errors import SmartSplitError
from smartsplit.plugins import call_factory, is_plugin, load_factory

if TYPE_CHECKING:
    from smartsplit.config import Config

FIELD = "data.dataset"
_TENSOR_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DATASET_KEYS = ("train", "test")


def load_data(config: Config) -> tuple[Dataset, Dataset]:
    """The (train, test) data sets ``config.data`` names: built-in or plug-in, subsampled and padded.

    Built-ins come from :func:`~smartsplit.data.datasets.load_dataset` (``synthetic`` from
    :func:`~smartsplit.data.datasets.synthetic`, sized by ``data.synthetic_*``); a plug-in is loaded and checked
    as this module's docstring says.
    """
    d = config.data
    if is_plugin(d.dataset):
        return _plugin_data(config)
    if d.dataset == "synthetic":  # its sizes are synthetic_train/test; limits and pad_to do not apply to it
        return (
            synthetic(d.synthetic_shape, d.synthetic_classes, d.synthetic_train, config.seed, split="train"),
            synthetic(d.synthetic_shape, d.synthetic_classes, d.synthetic_test, config.seed, split="test"),
        )
    train = load_dataset(d.dataset, "train", d.root, limit=d.train_limit, seed=config.seed)
    test = load_dataset(d.dataset, "test", d.root, limit=d.test_limit, seed=config.seed)
    if d.pad_to is not None:
        train, test = _padded(train, d.pad_to), _padded(test, d.pad_to)
    return train, test


def _padded(data: Dataset, side: int) -> Dataset:
    """``data`` with every image centred on a ``side`` x ``side`` canvas of its background (lowest) value."""
    h, w = data.x.shape[-2:]
    if side < max(h, w):
        raise SmartSplitError(f"data.pad_to: {side} is smaller than the {h}x{w} images; use at least {max(h, w)}")
    top, left = (side - h) // 2, (side - w) // 2
    x = F.pad(data.x, (left, side - w - left, top, side - h - top), value=float(data.x.min()))
    return Dataset(data.name, x, data.y, data.num_classes)


def _kept(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices of the seeded subsample of ``limit`` out of ``n`` examples (as :func:`load_dataset` keeps), or None."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


# --------------------------------------------------------------------------- plug-ins


def _plugin_data(config: Config) -> tuple[Dataset, Dataset]:
    d, spec = config.data, config.data.dataset
    where = f"{FIELD} {spec!r}"
    factory = load_factory(FIELD, spec)
    offered = {"root": d.root, "seed": config.seed, "train_limit": d.train_limit, "test_limit": d.test_limit}
    result = call_factory(FIELD, spec, factory, offered)
    num_classes: Any = None
    if isinstance(result, Mapping):
        num_classes = result.get("num_classes")
        if all(k in result for k in _TENSOR_KEYS):
            parts: tuple = tuple(result[k] for k in _TENSOR_KEYS)
        elif all(k in result for k in _DATASET_KEYS):
            parts = tuple(result[k] for k in _DATASET_KEYS)
        else:
            raise SmartSplitError(f"{where}: returned a mapping with keys {', '.join(map(str, result)) or '(none)'}; "
                                  f"it needs {', '.join(_TENSOR_KEYS)} or train, test (and optionally num_classes)")
    elif isinstance(result, (tuple, list)):
        parts = tuple(result)
    else:
        raise SmartSplitError(f"{where}: returned {type(result).__name__}; return (x_train, y_train, x_test, y_test) "
                              "tensors or (train, test) torch Datasets")
    limits = (d.train_limit, d.test_limit)
    if len(parts) == 4:
        full = [_from_tensors(where, split, x, y) for split, x, y in zip(("train", "test"), parts[0::2], parts[1::2])]
        _same_shape(where, full[0][0], full[1][0])
        classes = _num_classes(where, num_classes, full[0][1], full[1][1])
        splits = [_subsample(x, y, limit, config.seed) for (x, y), limit in zip(full, limits)]
    elif len(parts) == 2:
        splits = [_from_dataset(where, split, ds, limit, config.seed)
                  for split, ds, limit in zip(("train", "test"), parts, limits)]
        _same_shape(where, splits[0][0], splits[1][0])
        classes = _num_classes(where, num_classes, splits[0][1], splits[1][1])
    else:
        raise SmartSplitError(f"{where}: returned {len(parts)} items; return (x_train, y_train, x_test, y_test) "
                              "tensors or (train, test) torch Datasets")
    (x_train, y_train), (x_test, y_test) = splits
    name = spec
    train, test = Dataset(name, x_train, y_train, classes), Dataset(name, x_test, y_test, classes)
    if d.pad_to is not None:
        train, test = _padded(train, d.pad_to), _padded(test, d.pad_to)
    h, w = train.x.shape[-2:]
    if h != w:
        raise SmartSplitError(f"{where}: images are {h}x{w}, but models take square images; set data.pad_to to at "
                              f"least {max(h, w)}")
    return train, test


def _shape(shape: tuple | torch.Size) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _tensor(where: str, what: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError:
            raise SmartSplitError(f"{where}: {what} is a numpy array of {value.dtype}, not of numbers") from None
    raise SmartSplitError(f"{where}: {what} is a {type(value).__name__}, not a tensor (or numpy array)")


def _check_images(where: str, split: str, x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or min(x.shape, default=0) < 1:
        raise SmartSplitError(f"{where}: {split} images must be float N x C x H x W with N, C, H, W >= 1, got shape "
                              f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise SmartSplitError(f"{where}: {split} images are {x.dtype}, not float; scale them to floats "
                              "(e.g. x.float() / 255)")
    x = x.float()
    if not torch.isfinite(x).all():
        raise SmartSplitError(f"{where}: {split} images hold NaN or infinite values")
    return x


def _check_labels(where: str, split: str, y: torch.Tensor, n: int) -> torch.Tensor:
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise SmartSplitError(f"{where}: {split} labels are {y.dtype}, not integers (class indices 0, 1, ...)")
    if y.ndim != 1 or len(y) != n:
        raise SmartSplitError(f"{where}: {split} labels must be 1-D of length {n} (one per image), got shape "
                              f"{tuple(y.shape)}")
    return y.to(torch.int64)


def _from_tensors(where: str, split: str, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _tensor(where, f"{split} images", x), _tensor(where, f"{split} labels", y)
    x = _check_images(where, split, x)
    return x, _check_labels(where, split, y, len(x))


def _subsample(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = _kept(len(y), limit, seed)
    if keep is None:
        return x, y
    idx = torch.from_numpy(keep)
    return x[idx], y[idx]


def _same_shape(where: str, x_train: torch.Tensor, x_test: torch.Tensor) -> None:
    if x_train.shape[1:] != x_test.shape[1:]:
        raise SmartSplitError(f"{where}: train images are {_shape(x_train.shape[1:])} but test images are "
                              f"{_shape(x_test.shape[1:])}; both splits need one shape C x H x W")


def _as_label(value: Any) -> int | None:
    """``value`` as an int class index, or None if it is not an integer (bools are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool \
            and not value.is_floating_point() and not value.is_complex():
        return int(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        return int(value)
    return None


def _from_dataset(where: str, split: str, ds: Any, limit: int | None,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The items of a map-style Dataset (only the kept ones when ``limit`` applies) as image and label tensors."""
    if isinstance(ds, (torch.Tensor, np.ndarray)):
        raise SmartSplitError(f"{where}: the {split} set is a {type(ds).__name__}; return four tensors (x_train, "
                              "y_train, x_test, y_test) or two torch Datasets (train, test)")
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise SmartSplitError(f"{where}: the {split} set is a {type(ds).__name__}, not a map-style torch Dataset "
                              "(len() and indexing)")
    try:
        n = len(ds)
    except Exception as exc:
        raise SmartSplitError(f"{where}: len() of the {split} set raised {type(exc).__name__}: {exc}") from None
    if n < 1:
        raise SmartSplitError(f"{where}: the {split} set is empty")
    keep = _kept(n, limit, seed)
    images, labels = [], []
    for i in (range(n) if keep is None else keep.tolist()):
        try:
            item = ds[i]
        except Exception as exc:
            raise SmartSplitError(f"{where}: reading item {i} of the {split} set raised {type(exc).__name__}: "
                                  f"{exc}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise SmartSplitError(f"{where}: item {i} of the {split} set is a {type(item).__name__}, not an "
                                  "(image, label) pair")
        image, label = item
        if not isinstance(image, (torch.Tensor, np.ndarray)) or image.ndim != 3:
            got = f"shape {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
            raise SmartSplitError(f"{where}: item {i} of the {split} set has image {got}; it must be a float "
                                  "C x H x W tensor")
        image = _tensor(where, f"item {i}'s image", image)
        if not image.is_floating_point():
            raise SmartSplitError(f"{where}: item {i} of the {split} set has a {image.dtype} image, not float; "
                                  "scale it to floats (e.g. transforms.ToTensor() or x.float() / 255)")
        if images and image.shape != images[0].shape:
            raise SmartSplitError(f"{where}: item {i} of the {split} set is {_shape(image.shape)} but item 0 is "
                                  f"{_shape(images[0].shape)}; all images need one shape")
        index = _as_label(label)
        if index is None:
            raise SmartSplitError(f"{where}: item {i} of the {split} set has label {label!r} "
                                  f"({type(label).__name__}); it must be an int class index")
        images.append(image.float())
        labels.append(index)
    x = _check_images(where, split, torch.stack(images))
    return x, torch.tensor(labels, dtype=torch.int64)


def _num_classes(where: str, given: Any, y_train: torch.Tensor, y_test: torch.Tensor) -> int:
    low = int(min(y_train.min(), y_test.min()))
    high = int(max(y_train.max(), y_test.max()))
    if low < 0:
        raise SmartSplitError(f"{where}: label {low} is negative; labels are class indices 0, 1, ...")
    if given is None:
        classes = high + 1
        if classes < 2:
            raise SmartSplitError(f"{where}: every label is 0; a classifier needs at least 2 classes")
        return classes
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 2:
        raise SmartSplitError(f"{where}: num_classes must be an integer >= 2, got {given!r}")
    if high >= given:
        raise SmartSplitError(f"{where}: label {high} is outside 0..{int(given) - 1} (num_classes is {int(given)})")
    return int(given)
