"""Seeded partitioners that split a data set's indices among clients: IID, Dirichlet over labels, shards.

Each returns one sorted int64 index array per client; no index appears twice. Bad arguments raise
:class:`~smartsplit.errors.SmartSplitError` naming the argument.

:func:`partition` also takes your own partitioner, named ``"package.module:function"`` (``data.partition`` in a
config): see :func:`partition` for what it is given and must return.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from smartsplit.errors import SmartSplitError
from smartsplit.plugins import call_factory, is_plugin, load_factory


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float = 0.5,
              shards_per_client: int = 2, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Split ``range(len(labels))`` among ``num_clients`` clients with ``scheme``.

    ``scheme`` is a built-in name (:data:`SCHEMES`: "iid", "dirichlet", "shards") or a plug-in
    ``"package.module:function"``. The plug-in is called with, by name, those of ``labels`` (a 1-D int64 numpy
    array, a copy), ``num_clients``, ``seed``, ``alpha``, ``shards_per_client`` and ``min_size`` that its
    signature accepts (all of them if it takes ``**kwargs``); any other parameter needs a default. It returns a
    list (or tuple) of exactly ``num_clients`` integer index arrays (or lists), which are checked: every index
    in ``0 .. len(labels) - 1``, no index twice (within or across clients: overlapping clients are an error,
    since each sample belongs to one device), every client at least ``min_size`` samples. Samples may be left
    out. Problems raise :class:`~smartsplit.errors.SmartSplitError` naming ``data.partition``; the result is
    returned as sorted int64 arrays, like the built-ins'.
    """
    if is_plugin(scheme):
        return _plugin(scheme, labels, num_clients, alpha=alpha, shards_per_client=shards_per_client, seed=seed,
                       min_size=min_size)
    run = _SCHEMES.get(scheme)
    if run is None:
        raise SmartSplitError(f"unknown partition scheme {scheme!r}: use one of {', '.join(SCHEMES)}, "
                              "or your own as package.module:function")
    return run(labels, num_clients, alpha=alpha, shards_per_client=shards_per_client, seed=seed, min_size=min_size)


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


# The built-ins by name; each takes (labels, num_clients) and, by keyword, alpha, shards_per_client, seed, min_size.
_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": lambda labels, n, *, seed, **_: iid(labels, n, seed),
    "dirichlet": lambda labels, n, *, alpha, seed, min_size, **_: dirichlet(labels, n, alpha, seed, min_size=min_size),
    "shards": lambda labels, n, *, shards_per_client, seed, **_: shards(labels, n, shards_per_client, seed),
}
SCHEMES = tuple(_SCHEMES)


def _plugin(spec: str, labels: np.ndarray, num_clients: int, **options: Any) -> list[np.ndarray]:
    """Load, call and check the partitioner ``spec`` names (see :func:`partition`)."""
    field = "data.partition"
    y = _check(labels, num_clients)
    factory = load_factory(field, spec)
    offered = {"labels": y.copy(), "num_clients": int(num_clients), **options}
    parts = call_factory(field, spec, factory, offered)
    where = f"{field} {spec!r}"
    if isinstance(parts, np.ndarray) and parts.ndim == 2:
        parts = list(parts)
    if not isinstance(parts, (list, tuple)):
        raise SmartSplitError(f"{where}: returned {type(parts).__name__}, not a list of {num_clients} index arrays "
                              "(one per client)")
    if len(parts) != num_clients:
        raise SmartSplitError(f"{where}: returned {len(parts)} index arrays for {num_clients} clients; "
                              "give one per client")
    out, seen = [], np.zeros(len(y), dtype=bool)
    min_size = options.get("min_size", 1)
    for client, part in enumerate(parts):
        try:
            idx = np.asarray(part)
        except Exception as exc:
            raise SmartSplitError(f"{where}: client {client}'s indices are not an array ({type(exc).__name__})") from None
        if idx.size == 0:
            idx = idx.astype(np.int64).reshape(0)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise SmartSplitError(f"{where}: client {client}'s indices must be a 1-D integer array, got shape "
                                  f"{idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(y)):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise SmartSplitError(f"{where}: client {client} has index {bad}, outside 0..{len(y) - 1} "
                                  f"(the {len(y)} training samples)")
        if len(idx) < min_size:
            raise SmartSplitError(f"{where}: client {client} has {len(idx)} samples, fewer than {min_size}; "
                                  "give every client data")
        idx = np.sort(idx)
        twice = idx[1:][idx[1:] == idx[:-1]]
        if twice.size:
            raise SmartSplitError(f"{where}: client {client} lists index {int(twice[0])} twice; "
                                  "every sample goes to at most one client, once")
        if seen[idx].any():
            raise SmartSplitError(f"{where}: index {int(idx[seen[idx]][0])} is given to client {client} and to an "
                                  "earlier client; clients must not overlap")
        seen[idx] = True
        out.append(idx)
    return out


class Shards(Sequence[np.ndarray]):
    """Every client's sample indices in one array: client ``i``'s are ``indices[offsets[i]:offsets[i + 1]]``,
    handed out as views, so a fleet's shards are two arrays, not an array per client."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.indices = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if int(self.sizes.sum()) else \
            np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]
        return self.indices[self.offsets[i]:self.offsets[i + 1]]


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """How many examples of each class each client holds, [client, class] (at least ``num_classes`` columns)."""
    parts = parts if isinstance(parts, Shards) else Shards(parts)
    y = np.asarray(labels).astype(np.int64)
    width = max(num_classes, int(y.max()) + 1 if len(y) else 0)
    owner = np.repeat(np.arange(len(parts), dtype=np.int64), parts.sizes)
    return np.bincount(owner * width + y[parts.indices], minlength=len(parts) * width).reshape(len(parts), width)


def label_skew(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between each non-empty client's label distribution and the global one.

    0 means every client matches the global mix (IID); it approaches 1 when each client holds one class.
    """
    y = np.asarray(labels).astype(np.int64)
    glob = np.bincount(y, minlength=num_classes) / max(len(y), 1)
    counts = label_counts(y, parts, num_classes)
    sizes = counts.sum(axis=1)
    held = sizes > 0
    dists = 0.5 * np.abs(counts[held] / sizes[held, None] - np.pad(glob, (0, counts.shape[1] - len(glob)))).sum(axis=1)
    return float(np.mean(dists)) if len(dists) else 0.0


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
