"""Data sets and a partitioner as a user would write them, named in configs as ``plugin_examples:<name>``.

Small on purpose (200 training and 50 test images of 1 x 12 x 12, 4 classes) so that a whole experiment on them
runs in seconds. The ones after "go wrong" break the plug-in contracts, each in a way a user's code can
(tests/test_plugins.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES, SHAPE, TRAIN, TEST = 4, (1, 12, 12), 200, 50

calls: list[dict] = []  # the arguments each factory here was called with, newest last


def _blobs(n: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable images: one fixed mean image per class (from ``seed``) plus Gaussian noise."""
    means = torch.randn((CLASSES, *SHAPE), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 2 + 1 + 7919 * split)
    y = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=gen)]
    return means[y] + 0.5 * torch.randn((n, *SHAPE), generator=gen), y


def tensor_data(seed: int = 0, train_limit: int | None = None, test_limit: int | None = None):
    """Form (a): four tensors; the number of classes is inferred from the labels."""
    calls.append({"seed": seed, "train_limit": train_limit, "test_limit": test_limit})
    return (*_blobs(TRAIN, seed, 0), *_blobs(TEST, seed, 1))


class Blobs(Dataset):
    """A map-style torch Dataset of (C x H x W float image, int label) pairs; counts the items read."""

    def __init__(self, n: int, seed: int, split: int) -> None:
        self.x, self.y = _blobs(n, seed, split)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], int(self.y[i])


last_datasets: dict[str, Blobs] = {}


def dataset_data(root: str | None = None, seed: int = 0):
    """Form (b): two torch Datasets in a mapping, with num_classes given."""
    calls.append({"root": root, "seed": seed})
    last_datasets.update(train=Blobs(TRAIN, seed, 0), test=Blobs(TEST, seed, 1))
    return {**last_datasets, "num_classes": CLASSES}


def round_robin(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """A partitioner: samples sorted by label, then dealt to the clients in turn (so every client sees all classes)."""
    calls.append({"num_clients": num_clients, "seed": seed})
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    return [order[c::num_clients] for c in range(num_clients)]


# Plug-ins that go wrong (tests/test_plugins.py).


def uint8_images():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return x.clamp(0, 1).mul(255).to(torch.uint8), y, xt, yt


def float_labels():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return x, y.float(), xt, yt


def flat_images():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return x.flatten(1), y, xt.flatten(1), yt


def wrong_label_count():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return x, y[:-1], xt, yt


def shapes_disagree():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return x, y, xt[:, :, :10, :10], yt


def too_few_classes():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "num_classes": 3}


def not_square():
    x, y = _blobs(TRAIN, 0, 0)
    xt, yt = _blobs(TEST, 0, 1)
    return x[..., :10], y, xt[..., :10], yt


def three_things():
    return _blobs(TRAIN, 0, 0) + (None,)


def text():
    return "images"


def needs_path(path: str):
    return tensor_data()


def dataset_with_bad_items():
    return [(torch.zeros(*SHAPE), 0.5)] * 3, [(torch.zeros(*SHAPE), 1)] * 3


def overlapping(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    return [np.arange(len(labels))] * num_clients


def one_short(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    return list(np.array_split(np.arange(len(labels)), num_clients - 1))


def out_of_range(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    parts = np.array_split(np.arange(len(labels)), num_clients)
    parts[-1] = parts[-1] + 1
    return parts


def empty_client(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    return [np.arange(len(labels))] + [[] for _ in range(num_clients - 1)]


def float_indices(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    return [p.astype(float) for p in np.array_split(np.arange(len(labels)), num_clients)]


def raises(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    raise RuntimeError("broken partitioner")


# --------------------------------------------------------------------------- a strategy


def first_fit(num_units: int, seed: int):
    """The ``k`` lowest-numbered devices that fit anywhere, each at the deepest cut its memory holds."""
    from smartsplit import Assignment, RoundPlan, Strategy

    class DeepestFit(Strategy):
        name = "deepest-fit"

        def __init__(self) -> None:
            self.seen: list[int] = []  # devices reported, round after round (resume keeps them)

        def configure_round(self, rnd, candidates, k, rng):
            fitting = [c for c in candidates if c.feasible_cuts][:k]
            return RoundPlan(tuple(Assignment(c.device.id, c.feasible_cuts[-1]) for c in fitting),
                             excluded=len(candidates) - len([c for c in candidates if c.feasible_cuts]),
                             notes={"num_units": num_units, "seed": seed})

        def round_finished(self, rnd, reports, observations=None):
            self.seen += [r.device for r in reports]

        def state_dict(self):
            return {"seen": list(self.seen)}

        def load_state_dict(self, state):
            self.seen = list(state["seen"])

    return DeepestFit()


def not_a_strategy():
    return 42
