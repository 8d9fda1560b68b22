"""Traces over simulated time, piecewise constant: memory budgets (the bytes a device may use) and availability
(whether a device is online).

CSV form: header ``time_s,budget_mb``; one row per change; ``budget_mb`` is in MiB (1 MB = ``2**20``
bytes here, the same convention as the device catalog). The budget of the last row stays in force forever.
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from smartsplit.errors import SmartSplitError
from smartsplit.fleet.catalog import read_csv_rows
from smartsplit.records import MB

_HEADER = ("time_s", "budget_mb")


@dataclass(frozen=True)
class BudgetTrace:
    """Budget ``budgets_bytes[i]`` is in force on ``[times_s[i], times_s[i+1])``; the last one forever."""

    times_s: tuple[float, ...]
    budgets_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        times = tuple(float(t) for t in self.times_s)
        budgets = tuple(int(b) for b in self.budgets_bytes)
        if not times or len(times) != len(budgets):
            raise SmartSplitError("budget trace needs equally many times and budgets, at least one")
        if times[0] != 0.0:
            raise SmartSplitError(f"budget trace must start at time 0.0, starts at {times[0]}")
        if not all(math.isfinite(t) for t in times) or any(b <= a for a, b in zip(times, times[1:])):
            raise SmartSplitError("budget trace times must be finite and strictly increasing")
        if any(b < 0 for b in budgets):
            raise SmartSplitError("budget trace budgets must be >= 0 bytes")
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "budgets_bytes", budgets)

    def _index(self, t: float) -> int:
        return max(bisect.bisect_right(self.times_s, t) - 1, 0)

    def at(self, t: float) -> int:
        """Budget in force at time ``t`` (times before 0 get the first budget)."""
        return self.budgets_bytes[self._index(t)]

    def next_change(self, t: float) -> float | None:
        """Earliest time after ``t`` at which the budget differs from ``at(t)``; ``None`` if never."""
        i = self._index(t)
        current = self.budgets_bytes[i]
        for j in range(max(bisect.bisect_right(self.times_s, t), i + 1), len(self.times_s)):
            if self.budgets_bytes[j] != current:
                return self.times_s[j]
        return None

    def _segments(self, t0: float, t1: float) -> list[tuple[int, float]]:
        """(budget, duration) pieces covering ``[t0, t1)``; ``[(at(t0), 0.0)]`` when ``t1 == t0``."""
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0:
            raise SmartSplitError(f"time window must satisfy t0 <= t1 (finite), got [{t0}, {t1}]")
        if t1 == t0:
            return [(self.at(t0), 0.0)]
        pieces: list[tuple[int, float]] = []
        i = self._index(t0)
        start = t0
        while start < t1:
            end = self.times_s[i + 1] if i + 1 < len(self.times_s) else math.inf
            stop = min(end, t1)
            pieces.append((self.budgets_bytes[i], stop - start))
            start, i = stop, i + 1
        return pieces

    def min_over(self, t0: float, t1: float) -> int:
        """Smallest budget in force at any time in ``[t0, t1)`` (``at(t0)`` when ``t1 == t0``)."""
        return min(b for b, _ in self._segments(t0, t1))

    def quantile(self, q: float, t0: float, t1: float) -> int:
        """Time-weighted ``q``-quantile of the budget over ``[t0, t1)``.

        The smallest budget ``b`` such that the budget is ``<= b`` for at least a fraction ``q`` of the
        window (``q=0``: the minimum, ``q=1``: the maximum); ``at(t0)`` when ``t1 == t0``.
        """
        if not (0.0 <= q <= 1.0):
            raise SmartSplitError(f"quantile must be in [0, 1], got {q}")
        if len(self.budgets_bytes) == 1 and math.isfinite(t0) and math.isfinite(t1) and t0 <= t1:
            return self.budgets_bytes[0]  # a constant budget: what the pieces below would give, without them
        pieces = sorted(self._segments(t0, t1))
        total = sum(d for _, d in pieces)
        if total == 0.0:
            return pieces[0][0]
        target = q * total * (1 - 1e-12)
        acc = 0.0
        for budget, duration in pieces:
            acc += duration
            if acc > 0 and acc >= target:
                return budget
        return pieces[-1][0]


def constant_trace(budget_bytes: int) -> BudgetTrace:
    """A budget that never changes."""
    return BudgetTrace((0.0,), (int(budget_bytes),))


class BudgetTraces(Sequence[BudgetTrace]):
    """Every device's budget trace, by device id. A budget that never changes is a number in one array (its trace
    is made when read), so a fleet of constant budgets holds no object per device; the others are trace objects.

    ``constants[i]`` is device ``i``'s constant budget, or -1 where ``own[i]`` is its trace."""

    def __init__(self, constants: np.ndarray, own: Mapping[int, BudgetTrace] | None = None) -> None:
        self.constants = np.array(constants, dtype=np.int64)
        self.own = dict(own or {})
        if any(self.constants[i] != -1 for i in self.own) or np.any((self.constants == -1) & ~self._owned()):
            raise ValueError("each device needs a constant budget or a trace of its own, not both")

    def _owned(self) -> np.ndarray:
        owned = np.zeros(len(self.constants), dtype=bool)
        owned[list(self.own)] = True
        return owned

    @classmethod
    def of(cls, traces: Sequence[BudgetTrace]) -> BudgetTraces:
        """Columns of a list of traces (a one-budget trace becomes its number)."""
        constants = [t.budgets_bytes[0] if len(t.budgets_bytes) == 1 else -1 for t in traces]
        return cls(np.array(constants, dtype=np.int64), {i: t for i, t in enumerate(traces) if constants[i] == -1})

    def __len__(self) -> int:
        return len(self.constants)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        budget = int(self.constants[i])
        return constant_trace(budget) if budget >= 0 else self.own[int(i)]

    def forecast(self, ids: np.ndarray, q: float, t0: float, t1: float) -> np.ndarray:
        """The time-weighted ``q``-quantile of each device's budget over ``[t0, t1)`` (``BudgetTrace.quantile``),
        an array in the order of ``ids``: a constant budget is itself, without making its trace."""
        ids = np.asarray(ids, dtype=np.int64)
        out = self.constants[ids].copy()
        for row in np.flatnonzero(out < 0).tolist():
            out[row] = self.own[int(ids[row])].quantile(q, t0, t1)
        return out


def foreground_app_trace(
    capacity_bytes: int,
    seed: int,
    horizon_s: float,
    *,
    mean_gap_s: float = 60.0,
    mean_hold_s: float = 30.0,
    max_take: float = 0.8,
    floor: float = 0.05,
) -> BudgetTrace:
    """Seeded model of other apps taking and releasing memory over ``[0, horizon_s)``.

    Apps arrive as a Poisson process (mean gap ``mean_gap_s``); each takes a fraction of capacity drawn
    uniformly from ``[0, max_take)`` for an exponential hold time (mean ``mean_hold_s``), then releases it.
    Budget = capacity - memory taken, never below ``floor * capacity``. Only real changes are recorded; the
    budget at ``horizon_s`` stays in force afterwards. Deterministic for a seed.
    """
    if capacity_bytes < 0:
        raise SmartSplitError(f"trace capacity must be >= 0 bytes, got {capacity_bytes}")
    if not (math.isfinite(horizon_s) and horizon_s >= 0):
        raise SmartSplitError(f"trace horizon must be a finite number >= 0, got {horizon_s}")
    if not (mean_gap_s > 0 and mean_hold_s > 0):
        raise SmartSplitError("trace mean_gap_s and mean_hold_s must be > 0")
    if not (0.0 <= max_take <= 1.0 and 0.0 <= floor <= 1.0):
        raise SmartSplitError("trace max_take and floor must be fractions in [0, 1]")
    rng = np.random.default_rng(seed)
    events: list[tuple[float, float]] = []  # (time, change in fraction taken)
    t = float(rng.exponential(mean_gap_s))
    while t < horizon_s:
        take = float(rng.uniform(0.0, max_take))
        hold = float(rng.exponential(mean_hold_s))
        events.append((t, take))
        if t + hold < horizon_s:
            events.append((t + hold, -take))
        t += float(rng.exponential(mean_gap_s))
    events.sort()

    floor_bytes = math.ceil(floor * capacity_bytes)
    times, budgets = [0.0], [int(capacity_bytes)]
    taken = 0.0
    for k, (time, delta) in enumerate(events):
        taken += delta
        if k + 1 < len(events) and events[k + 1][0] == time:
            continue  # apply simultaneous events together
        budget = max(floor_bytes, int(capacity_bytes) - round(max(taken, 0.0) * capacity_bytes))
        if budget != budgets[-1]:
            times.append(time)
            budgets.append(budget)
    return BudgetTrace(tuple(times), tuple(budgets))


def save_trace_csv(trace: BudgetTrace, path: str | Path) -> None:
    """Write ``time_s,budget_mb`` (MiB); exact round trip through :func:`load_trace_csv`."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_HEADER)
        for t, b in zip(trace.times_s, trace.budgets_bytes):
            writer.writerow([repr(float(t)), repr(b / MB)])


def load_trace_csv(path: str | Path) -> BudgetTrace:
    """Read a ``time_s,budget_mb`` CSV (MiB, 2**20 bytes); errors name the file and line."""

    def budget(mb: float) -> int:
        if mb < 0:
            raise ValueError(f"negative budget {mb} MB")
        return round(mb * MB)

    times, budgets = _read_series(path, _HEADER, budget, "trace")
    return BudgetTrace(times, budgets)


def _read_series(path: str | Path, header: tuple[str, str], value, what: str) -> tuple[tuple[float, ...], tuple]:
    """A piecewise-constant series from a two-column CSV: times from 0, strictly increasing; ``value`` turns a
    number into the series' value (raising ValueError for a bad one). Errors name the file and line."""
    src = str(path)
    rows = read_csv_rows(path, what)
    expected = ",".join(header)
    if not rows:
        raise SmartSplitError(f"{src}: line 1: empty file, expected header '{expected}'")
    if tuple(c.strip() for c in rows[0]) != header:
        raise SmartSplitError(f"{src}: line 1: expected header '{expected}', got '{','.join(rows[0])}'")
    times: list[float] = []
    values: list = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise SmartSplitError(f"{src}: line {lineno}: expected 2 columns ({expected}), got {len(row)}")
        try:
            t, v = float(row[0]), float(row[1])
        except ValueError as exc:
            raise SmartSplitError(f"{src}: line {lineno}: non-numeric value ({exc})") from exc
        if not (math.isfinite(t) and math.isfinite(v)):
            raise SmartSplitError(f"{src}: line {lineno}: values must be finite numbers")
        if not times and t != 0.0:
            raise SmartSplitError(f"{src}: line {lineno}: first time must be 0, got {t}")
        if times and t <= times[-1]:
            raise SmartSplitError(f"{src}: line {lineno}: time {t} is not after the previous time {times[-1]}")
        try:
            values.append(value(v))
        except ValueError as exc:
            raise SmartSplitError(f"{src}: line {lineno}: {exc}") from None
        times.append(t)
    if not times:
        raise SmartSplitError(f"{src}: line {len(rows) + 1}: no data rows after the header")
    return tuple(times), tuple(values)


# --------------------------------------------------------------------------- availability

_AVAILABILITY_HEADER = ("time_s", "online")


@dataclass(frozen=True)
class AvailabilityTrace:
    """When a device is online: ``online[i]`` holds on ``[times_s[i], times_s[i+1])``, the last one forever.

    CSV form: header ``time_s,online``, one row per change, ``online`` 1 or 0, times from 0.
    """

    times_s: tuple[float, ...]
    online: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.times_s or len(self.times_s) != len(self.online) or self.times_s[0] != 0.0:
            raise SmartSplitError("availability trace needs equally many times and states, the first at time 0")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:])):
            raise SmartSplitError("availability trace times must be strictly increasing")

    def online_at(self, t: float) -> bool:
        return self.online[max(bisect.bisect_right(self.times_s, t) - 1, 0)]

    def online_from(self, t: float) -> float | None:
        """The first moment at or after ``t`` the device is online; None if it never is again."""
        if self.online_at(t):
            return t
        for j in range(bisect.bisect_right(self.times_s, t), len(self.times_s)):
            if self.online[j]:
                return self.times_s[j]
        return None

    def offline_from(self, t: float) -> float | None:
        """The first moment at or after ``t`` the device is offline; None if it stays online."""
        if not self.online_at(t):
            return t
        for j in range(bisect.bisect_right(self.times_s, t), len(self.times_s)):
            if not self.online[j]:
                return self.times_s[j]
        return None


def always_online() -> AvailabilityTrace:
    return AvailabilityTrace((0.0,), (True,))


def on_off_trace(seed: int | list[int], mean_on_s: float, mean_off_s: float, horizon_s: float) -> AvailabilityTrace:
    """Alternating online and offline periods, each exponentially long with its mean; the first state drawn
    with the long-run share of time online. Seeded; the last state holds after ``horizon_s``."""
    rng = np.random.default_rng(seed)
    state = bool(rng.random() < mean_on_s / (mean_on_s + mean_off_s))
    times, states, t = [0.0], [state], 0.0
    while True:
        t += float(rng.exponential(mean_on_s if state else mean_off_s))
        if t >= horizon_s:
            return AvailabilityTrace(tuple(times), tuple(states))
        state = not state
        times.append(t)
        states.append(state)


def save_availability_csv(trace: AvailabilityTrace, path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_AVAILABILITY_HEADER)
        for t, on in zip(trace.times_s, trace.online):
            writer.writerow([repr(float(t)), int(on)])


def load_availability_csv(path: str | Path) -> AvailabilityTrace:
    """Read a ``time_s,online`` CSV (online: 1 or 0); errors name the file and line."""

    def state(v: float) -> bool:
        if v not in (0.0, 1.0):
            raise ValueError(f"online must be 1 or 0, got {v:g}")
        return v == 1.0

    times, states = _read_series(path, _AVAILABILITY_HEADER, state, "availability")
    return AvailabilityTrace(times, states)
