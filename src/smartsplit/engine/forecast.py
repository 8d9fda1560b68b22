"""What the central server predicts for the devices it may pick: each device's plan at its budget forecast, its
peak and its step, round and edge-compute seconds, cut by cut.

Predictions are made for many devices at once, in arrays, and a cut only when a strategy first reads it: the
on-device manager's choice (``memory.ondevice.fastest``) and the time model (``fleet.clock``) are the same
functions a single device uses, given arrays, so every figure equals the one-device computation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from smartsplit.fleet import Device
from smartsplit.fleet.clock import EdgeSpec, model_transfer_s, step_times
from smartsplit.memory.ondevice import OnDeviceManager, fastest, quantize
from smartsplit.models.profile import ModelProfile
from smartsplit.roles.device import UNLIMITED
from smartsplit.strategies.base import PerCut


@dataclass(frozen=True)
class _Devices:
    """The time model's view of many devices (``fleet.clock`` reads these three fields)."""

    flops_per_s: np.ndarray
    uplink_bytes_per_s: np.ndarray
    downlink_bytes_per_s: np.ndarray


@dataclass(frozen=True)
class CutForecast:
    """One cut's predictions, one entry per device of the batch."""

    peaks: list[int]  # the fastest fitting plan's peak, or where none fits the plain plan's (above the budget)
    step_s: list[float]  # one local step without queueing
    round_s: list[float]  # the device's whole round, model transfers included
    edge_s: list[float]  # edge compute the round needs


class Forecast:
    """Predictions for a batch of devices, each at its budget. ``planner`` is any of the fleet's on-device
    managers: only what they share is used (the memo of plan searches, batch, optimizer slots, rules, link
    round trip), never its own device's speed."""

    def __init__(self, planner: OnDeviceManager, profile: ModelProfile, devices: Sequence[Device], budgets: Sequence[int],
                 edge_specs: Sequence[EdgeSpec], steps: Sequence[int]) -> None:
        self.planner, self.profile = planner, profile
        self.devices = _Devices(
            np.array([d.flops_per_s for d in devices], dtype=float),
            np.array([d.uplink_bytes_per_s for d in devices], dtype=float),
            np.array([d.downlink_bytes_per_s for d in devices], dtype=float),
        )
        self.edge_specs = EdgeSpec(np.array([e.flops_per_s for e in edge_specs], dtype=float),
                                   np.array([e.latency_s for e in edge_specs], dtype=float))
        self.steps = np.array(steps, dtype=np.int64)
        groups: dict[int, list[int]] = {}  # devices whose budgets round alike share their plan options
        for row, budget in enumerate(budgets):
            groups.setdefault(quantize(budget, planner.resolution), []).append(row)
        self.groups = {budget: np.array(rows) for budget, rows in groups.items()}
        self.num_units = profile.num_units
        self._cuts: dict[int, CutForecast] = {}
        self._matrices: dict[str, np.ndarray] = {}

    def figures(self, row: int) -> dict[str, PerCut]:
        """Device ``row``'s peaks, step, round and edge times per cut, as a ``Candidate`` takes them."""
        return {name: _Figure(self, field, row) for name, field in
                (("peaks", "peaks"), ("step_times", "step_s"), ("round_times", "round_s"), ("edge_times", "edge_s"))}

    def matrix(self, field: str) -> np.ndarray:
        """One figure for every device and cut, [row, cut - 1] (every cut predicted)."""
        if field not in self._matrices:
            self._matrices[field] = np.array([getattr(self.at(cut), field) for cut in range(1, self.num_units + 1)]).T
        return self._matrices[field]

    def at(self, cut: int) -> CutForecast:
        if cut not in self._cuts:
            self._cuts[cut] = self._predict(cut)
        return self._cuts[cut]

    def _predict(self, cut: int) -> CutForecast:
        n = len(self.steps)
        peaks, recompute, trips = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        roomy = self.planner.roomy(cut)  # budgets from there up share their options: one group
        groups: dict[int, list[np.ndarray]] = {}
        for budget, rows in self.groups.items():
            groups.setdefault(min(budget, roomy), []).append(rows)
        for budget, parts in groups.items():
            rows = np.concatenate(parts)
            options = self.planner.options(cut, budget) or self.planner.options(cut, UNLIMITED)
            pick = fastest(options, self.devices.flops_per_s[rows], self.planner.round_trip_s)
            peaks[rows] = np.array([o.memory.total for o in options], dtype=np.int64)[pick]
            recompute[rows] = np.array([int(o.recompute_flops) for o in options], dtype=np.int64)[pick]
            trips[rows] = np.array([o.round_trips for o in options], dtype=np.int64)[pick]
        step = step_times(self.profile, cut, self.devices, self.edge_specs, 1.0, recompute, trips)
        total = step.total  # an array: the forward and edge seconds are per device
        transfers = sum(model_transfer_s(self.profile, cut, self.devices, self.edge_specs))
        return CutForecast(
            peaks=peaks.tolist(),
            step_s=total.tolist(),
            round_s=(self.steps * total + transfers).tolist(),
            edge_s=(self.steps * step.edge_s).tolist(),
        )


class _Figure(PerCut):
    """One device's figure per cut, read from its batch's forecast: nothing is stored per device."""

    __slots__ = ("_forecast", "_field", "_row")

    def __init__(self, forecast: Forecast, field: str, row: int) -> None:
        self._forecast, self._field, self._row = forecast, field, row

    def __len__(self) -> int:
        return self._forecast.num_units

    def __getitem__(self, index):
        if type(index) is int and 0 <= index < self._forecast.num_units:  # the common read, kept short
            return self._at(index)
        return super().__getitem__(index)

    def _at(self, index: int):
        return getattr(self._forecast.at(index + 1), self._field)[self._row]

    @classmethod
    def gather(cls, figures: Sequence["_Figure"]) -> np.ndarray:
        """The rows of each forecast's matrix at once (figures of one field; another mix is read one by one)."""
        if len({f._field for f in figures}) != 1:
            return super().gather(figures)
        batches: dict[int, tuple[Forecast, list[int], list[int]]] = {}
        for position, f in enumerate(figures):
            batch = batches.setdefault(id(f._forecast), (f._forecast, [], []))
            batch[1].append(position)
            batch[2].append(f._row)
        parts = [(positions, forecast.matrix(figures[0]._field)[rows]) for forecast, positions, rows in batches.values()]
        out = np.empty((len(figures), parts[0][1].shape[1]), dtype=np.result_type(*(m for _, m in parts)))
        for positions, values in parts:
            out[positions] = values
        return out
