"""Seeded partitioners that split a data set's indices among clients: IID, Dirichlet over labels, shards.

Each returns one sorted int64 index array per client; no index appears twice. Bad arguments raise
:class:`~smartsplit.errors.SmartSplitError` naming the argument.
"""

from __future__ import annotations

import math

import numpy as np

from smartsplit.errors import SmartSplitError

SCHEMES = ("iid", "dirichlet", "shards")


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float = 0.5,
              shards_per_client: int = 2, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Split ``range(len(labels))`` among ``num_clients`` clients with ``scheme`` ("iid", "dirichlet", "shards")."""
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    if scheme == "shards":
        return shards(labels, num_clients, shards_per_client, seed)
    raise SmartSplitError(f"unknown partition scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random split into near-equal parts (sizes differ by at most one)."""
    y = _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(y))
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 1) -> list[np.ndarray]:
    """Per class, split its indices among clients in proportions drawn from Dir(alpha).

    Small ``alpha`` gives strong label skew, large ``alpha`` approaches IID. Clients left with fewer than
    ``min_size`` samples are topped up with random samples from the largest clients.
    """
    y = _check(labels, num_clients)
    if not _is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise SmartSplitError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not _is_int(min_size) or min_size < 0:
        raise SmartSplitError(f"min_size must be an integer >= 0, got {min_size!r}")
    if min_size * num_clients > len(y):
        raise SmartSplitError(f"min_size ({min_size}) x num_clients ({num_clients}) is more than the "
                              f"{len(y)} samples: lower min_size or num_clients")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        props = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
    out = [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]
    sizes = np.array([len(p) for p in out])
    for client in np.argsort(sizes, kind="stable"):
        while len(out[client]) < min_size:  # top up from the currently largest client
            donor = int(np.argmax([len(p) for p in out]))
            take = min(min_size - len(out[client]), len(out[donor]) - min_size)
            out[client] = np.concatenate([out[client], out[donor][-take:]])
            out[donor] = out[donor][:-take]
    return [np.sort(p) for p in out]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Sort by label, cut into ``num_clients * shards_per_client`` equal shards, deal each client random shards."""
    y = _check(labels, num_clients)
    if not _is_int(shards_per_client) or shards_per_client < 1:
        raise SmartSplitError(f"shards_per_client must be an integer >= 1, got {shards_per_client!r}")
    total = num_clients * shards_per_client
    if total > len(y):
        raise SmartSplitError(f"num_clients ({num_clients}) x shards_per_client ({shards_per_client}) is more "
                              f"than the {len(y)} samples: lower one of them")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    ordered = perm[np.argsort(y[perm], kind="stable")]  # by label, random order within a label
    pieces = np.array_split(ordered, total)
    deal = rng.permutation(total).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in deal]


def label_skew(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between each non-empty client's label distribution and the global one.

    0 means every client matches the global mix (IID); it approaches 1 when each client holds one class.
    """
    y = np.asarray(labels).astype(np.int64)
    glob = np.bincount(y, minlength=num_classes) / max(len(y), 1)
    dists = [0.5 * np.abs(np.bincount(y[p], minlength=num_classes) / len(p) - glob).sum()
             for p in parts if len(p)]
    return float(np.mean(dists)) if dists else 0.0


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    """Labels as a 1-D int64 array, after checking ``num_clients`` against it."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise SmartSplitError(f"labels must be a non-empty 1-D integer array, got shape {y.shape} "
                              f"dtype {y.dtype}")
    if not _is_int(num_clients) or num_clients < 1:
        raise SmartSplitError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > len(y):
        raise SmartSplitError(f"num_clients ({num_clients}) is more than the {len(y)} samples: "
                              "use fewer clients or more data")
    return y.astype(np.int64)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
