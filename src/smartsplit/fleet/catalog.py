"""Device catalog and seeded fleet sampling.

Units: catalog memory is in MiB (``2**20`` bytes); speed in GFLOP/s (``1e9`` FLOP/s); bandwidth in
Mbit/s (``1e6`` bit/s). A sampled :class:`Device` carries plain SI figures: bytes, FLOP/s, bytes/s.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from smartsplit.errors import SmartSplitError
from smartsplit.records import MB

_NUMERIC_FIELDS = ("memory_mb", "gflops", "uplink_mbps", "downlink_mbps")
_FLEET_HEADER = (
    "id",
    "device_class",
    "memory_bytes",
    "flops_per_s",
    "uplink_bytes_per_s",
    "downlink_bytes_per_s",
)


@dataclass(frozen=True)
class DeviceClass:
    """One catalog entry: representative figures for a kind of device."""

    name: str
    memory_mb: float  # MiB a training app may hold
    gflops: float  # sustained fp32 training speed
    uplink_mbps: float
    downlink_mbps: float
    description: str = ""


@dataclass(frozen=True)
class Device:
    """One concrete device of a fleet, in SI units."""

    id: int
    device_class: str
    memory_bytes: int
    flops_per_s: float
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float


class Fleet(Sequence[Device]):
    """Devices held as columns: an array per figure, a row per device (id = row). Indexing gives a ``Device``
    (made when read), so a fleet of 100,000 devices is not 100,000 objects."""

    def __init__(self, classes: Sequence[str], class_index: np.ndarray, memory_bytes: np.ndarray, speeds: np.ndarray) -> None:
        self.classes = tuple(classes)
        self.class_index = np.asarray(class_index, dtype=np.int64)
        self.memory_bytes = np.asarray(memory_bytes, dtype=np.int64)
        self.speeds = np.asarray(speeds, dtype=float).reshape(len(self.class_index), 3)  # flops/s, uplink, downlink

    @classmethod
    def of(cls, devices: Iterable[Device]) -> "Fleet":
        """``devices`` (ids ``0..n-1`` in order) as columns."""
        devices = list(devices)
        if [d.id for d in devices] != list(range(len(devices))):
            raise SmartSplitError(f"fleet: device ids must be 0..{len(devices) - 1} in order")
        classes = sorted({d.device_class for d in devices})
        return cls(classes, [classes.index(d.device_class) for d in devices], [d.memory_bytes for d in devices],
                   [(d.flops_per_s, d.uplink_bytes_per_s, d.downlink_bytes_per_s) for d in devices])

    def __len__(self) -> int:
        return len(self.class_index)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]
        flops, up, down = self.speeds[i].tolist()
        return Device(i, self.classes[self.class_index[i]], int(self.memory_bytes[i]), flops, up, down)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Fleet({len(self)} devices of {', '.join(self.classes)})"


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _parse_class(name: str, entry: Any, source: str) -> DeviceClass:
    if not isinstance(entry, Mapping):
        raise SmartSplitError(f"{source}: class '{name}' must be a mapping of fields")
    allowed = set(_NUMERIC_FIELDS) | {"description"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise SmartSplitError(
            f"{source}: class '{name}' has unknown field '{unknown[0]}' "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    values: dict[str, float] = {}
    for field in _NUMERIC_FIELDS:
        if field not in entry:
            raise SmartSplitError(f"{source}: class '{name}' is missing field '{field}'")
        if not _positive_number(entry[field]):
            raise SmartSplitError(
                f"{source}: class '{name}' field '{field}' must be a positive number, got {entry[field]!r}"
            )
        values[field] = float(entry[field])
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise SmartSplitError(f"{source}: class '{name}' field 'description' must be a string")
    return DeviceClass(name=name, description=description, **values)


def load_catalog(path: str | Path | None = None) -> dict[str, DeviceClass]:
    """Load a device catalog from YAML; ``None`` loads the catalog shipped with SmartSplit."""
    if path is None:
        source = "shipped catalog smartsplit/fleet/catalog.yaml"
        try:
            text = resources.files("smartsplit.fleet").joinpath("catalog.yaml").read_text(encoding="utf-8")
        except OSError as exc:
            raise SmartSplitError(f"{source} cannot be read ({exc}); reinstall smartsplit") from exc
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise SmartSplitError(f"{source}: catalog file not found") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise SmartSplitError(f"{source}: catalog file cannot be read ({exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SmartSplitError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, Mapping) or not raw:
        raise SmartSplitError(f"{source}: catalog must be a non-empty mapping of class name -> fields")
    return {str(name): _parse_class(str(name), entry, source) for name, entry in raw.items()}


def _largest_remainder(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    total = sum(weights.values())
    quotas = {name: n * w / total for name, w in weights.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    left = n - sum(counts.values())
    order = list(weights)  # ties go to the class named first
    by_remainder = sorted(order, key=lambda name: (-(quotas[name] - counts[name]), order.index(name)))
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def sample_fleet(
    n: int,
    proportions: Mapping[str, float],
    seed: int,
    catalog: Mapping[str, DeviceClass] | None = None,
    jitter: float = 0.2,
) -> Fleet:
    """Sample ``n`` devices from catalog classes in the given (normalised) proportions.

    Counts per class use largest remainders so they sum to ``n`` exactly. Each figure of each device is
    the class figure times ``exp(N(0, jitter))`` (median equals the class figure). Device order is
    shuffled with the seed; ids are positions ``0..n-1``. Same arguments, same fleet.
    """
    cat = load_catalog() if catalog is None else catalog
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise SmartSplitError(f"fleet size must be a non-negative integer, got {n!r}")
    if not (isinstance(jitter, (int, float)) and math.isfinite(jitter) and jitter >= 0):
        raise SmartSplitError(f"fleet jitter must be a non-negative number, got {jitter!r}")
    if not proportions:
        raise SmartSplitError("fleet proportions are empty: name at least one device class")
    for name, p in proportions.items():
        if name not in cat:
            raise SmartSplitError(f"unknown device class '{name}' (known: {', '.join(cat)})")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise SmartSplitError(f"proportion of device class '{name}' must be a number >= 0, got {p!r}")
    if sum(proportions.values()) <= 0:
        raise SmartSplitError("fleet proportions are all zero: give at least one class a positive share")

    counts = _largest_remainder(int(n), {k: float(v) for k, v in proportions.items()})
    rng = np.random.default_rng(seed)
    names = [name for name, count in counts.items() if count > 0]
    class_index, memory, speeds = [], [], []
    for k, name in enumerate(names):
        c, count = cat[name], counts[name]
        f = np.exp(rng.normal(0.0, jitter, size=(count, 4))) if jitter > 0 else np.ones((count, 4))
        class_index.append(np.full(count, k))
        memory.append(np.maximum(1, np.rint(c.memory_mb * MB * f[:, 0])).astype(np.int64))
        speeds.append(np.stack([c.gflops * 1e9 * f[:, 1], c.uplink_mbps * 1e6 / 8 * f[:, 2],
                                c.downlink_mbps * 1e6 / 8 * f[:, 3]], axis=1))
    order = rng.permutation(sum(counts[name] for name in names))
    if not names:
        return Fleet((), np.zeros(0), np.zeros(0), np.zeros((0, 3)))
    return Fleet(names, np.concatenate(class_index)[order], np.concatenate(memory)[order], np.concatenate(speeds)[order])


def fleet_to_csv(devices: Iterable[Device], path: str | Path) -> None:
    """Write a fleet as CSV (exact round trip through :func:`fleet_from_csv`)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_FLEET_HEADER)
        for d in devices:
            writer.writerow(
                [
                    d.id,
                    d.device_class,
                    d.memory_bytes,
                    repr(float(d.flops_per_s)),
                    repr(float(d.uplink_bytes_per_s)),
                    repr(float(d.downlink_bytes_per_s)),
                ]
            )


def read_csv_rows(path: str | Path, what: str) -> list[list[str]]:
    """All rows of a CSV file; a missing or unreadable file is a clear error naming it."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.reader(fh))
    except FileNotFoundError as exc:
        raise SmartSplitError(f"{path}: {what} file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SmartSplitError(f"{path}: {what} file cannot be read ({exc})") from exc


def fleet_from_csv(path: str | Path) -> list[Device]:
    """Read a fleet written by :func:`fleet_to_csv`; errors name the file and line."""
    src = str(path)
    rows = read_csv_rows(path, "fleet")
    if not rows or tuple(c.strip() for c in rows[0]) != _FLEET_HEADER:
        raise SmartSplitError(f"{src}: line 1: expected header '{','.join(_FLEET_HEADER)}'")
    devices: list[Device] = []
    seen: set[int] = set()
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(_FLEET_HEADER):
            raise SmartSplitError(
                f"{src}: line {lineno}: expected {len(_FLEET_HEADER)} columns, got {len(row)}"
            )
        try:
            dev_id, mem = int(row[0]), int(row[2])
            speeds = [float(x) for x in row[3:]]
        except ValueError as exc:
            raise SmartSplitError(f"{src}: line {lineno}: non-numeric value ({exc})") from exc
        name = row[1].strip()
        if not name:
            raise SmartSplitError(f"{src}: line {lineno}: empty device_class")
        if mem <= 0 or not all(_positive_number(s) for s in speeds):
            raise SmartSplitError(f"{src}: line {lineno}: memory, speed and bandwidths must be positive")
        if dev_id in seen:
            raise SmartSplitError(f"{src}: line {lineno}: duplicate device id {dev_id}")
        seen.add(dev_id)
        devices.append(Device(dev_id, name, mem, *speeds))
    return devices
