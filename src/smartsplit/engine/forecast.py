"""What the central server predicts for the devices it may pick: each device's plan at its budget forecast, its
peak and its step, round and edge-compute seconds, cut by cut.

Predictions are made for many devices at once, in arrays, and a cut only when a strategy first reads it: the
on-device manager's choice (``memory.ondevice.fastest``) and the time model (``fleet.clock``) are the same
functions a single device uses, given arrays, so every figure equals the one-device computation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from smartsplit.fleet import Device
from smartsplit.fleet.clock import EdgeSpec, model_transfer_s, step_times
from smartsplit.memory.ondevice import OnDeviceManager, fastest, quantize
from smartsplit.models.profile import ModelProfile
from smartsplit.roles.device import UNLIMITED
from smartsplit.strategies.base import Candidate, Candidates, CandidateSource, PerCut


@dataclass(frozen=True)
class _Devices:
    """The time model's view of many devices (``fleet.clock`` reads these three fields)."""

    flops_per_s: np.ndarray
    uplink_bytes_per_s: np.ndarray
    downlink_bytes_per_s: np.ndarray


FIELDS = {"peaks": np.int64, "step_times": float, "round_times": float, "edge_times": float}


class FleetForecast:
    """Every device's predictions as columns, [device, cut - 1] per figure: peaks (the fastest fitting plan's, or
    where none fits the plain plan's, above the budget), one local step's seconds without queueing, the whole
    round's (model transfers included) and the edge compute it needs. A device's row holds what was predicted at
    its latest budget forecast and speed, each cut predicted the first time it is read; it is kept until that
    forecast or speed changes.

    ``planner`` is any of the fleet's on-device managers: only what they share is used (the memo of plan
    searches, batch, optimizer slots, rules, link round trip), never its own device's speed."""

    def __init__(self, planner: OnDeviceManager, profile: ModelProfile, num_devices: int, edge_specs: Sequence[EdgeSpec],
                 edge_of: np.ndarray, steps: np.ndarray) -> None:
        self.planner, self.profile = planner, profile
        self.num_units = L = profile.num_units
        self.edge_flops = np.array([e.flops_per_s for e in edge_specs], dtype=float)[edge_of]
        self.edge_latency = np.array([e.latency_s for e in edge_specs], dtype=float)[edge_of]
        self.steps = np.asarray(steps, dtype=np.int64)
        self.budgets = np.full(num_devices, -1, dtype=np.int64)  # what each row was predicted at (-1: never)
        self.groups = np.zeros(num_devices, dtype=np.int64)  # the budget rounded as plans round it
        self.speeds = np.zeros((num_devices, 3))  # flops/s, uplink and downlink bytes/s
        self.known = np.zeros((num_devices, L), dtype=bool)
        self.values = {name: np.zeros((num_devices, L), dtype=dtype) for name, dtype in FIELDS.items()}
        self.offered = np.zeros(0, dtype=np.int64)  # the devices of the latest ``offer``

    def offer(self, ids: np.ndarray, budgets: np.ndarray, speeds: np.ndarray) -> None:
        """The round's devices, their budget forecasts and speeds [row: flops/s, uplink, downlink]: rows whose
        forecast or speed changed are predicted afresh when read."""
        fresh = (self.budgets[ids] != budgets) | (self.speeds[ids] != speeds).any(axis=1)
        changed = ids[fresh]
        if len(changed):
            self.budgets[changed], self.speeds[changed] = budgets[fresh], speeds[fresh]
            self.groups[changed] = [quantize(b, self.planner.resolution) for b in budgets[fresh].tolist()]
            self.known[changed] = False
        self.offered = ids

    def read(self, name: str, ids: np.ndarray, cuts: Sequence[int]) -> np.ndarray:
        """Figure ``name`` of devices ``ids`` at ``cuts``, [row, position in cuts]."""
        for cut in cuts:
            missing = ids[~self.known[ids, cut - 1]]
            if len(missing):
                self._predict(cut, np.unique(missing))
        return self.values[name][ids[:, None], np.asarray(cuts) - 1]

    def at(self, name: str, cut: int, device: int):
        """One device's figure at one cut (the cut predicted for every offered device that lacks it)."""
        if not self.known[device, cut - 1]:
            self._predict(cut, np.union1d(self.offered[~self.known[self.offered, cut - 1]], [device]))
        return self.values[name][device, cut - 1].item()

    def _predict(self, cut: int, rows: np.ndarray) -> None:
        n = len(rows)
        peaks, recompute, trips = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        flops = self.speeds[rows, 0]
        groups = np.minimum(self.groups[rows], self.planner.roomy(cut))  # from roomy up budgets share their options
        for budget in np.unique(groups).tolist():
            members = np.flatnonzero(groups == budget)
            options = self.planner.options(cut, budget) or self.planner.options(cut, UNLIMITED)
            pick = fastest(options, flops[members], self.planner.round_trip_s)
            peaks[members] = np.array([o.memory.total for o in options], dtype=np.int64)[pick]
            recompute[members] = np.array([int(o.recompute_flops) for o in options], dtype=np.int64)[pick]
            trips[members] = np.array([o.round_trips for o in options], dtype=np.int64)[pick]
        devices = _Devices(flops, self.speeds[rows, 1], self.speeds[rows, 2])
        edges = EdgeSpec(self.edge_flops[rows], self.edge_latency[rows])
        step = step_times(self.profile, cut, devices, edges, 1.0, recompute, trips)
        total = step.total  # an array: the forward and edge seconds are per device
        transfers = sum(model_transfer_s(self.profile, cut, devices, edges))
        column = cut - 1
        self.values["peaks"][rows, column] = peaks
        self.values["step_times"][rows, column] = total
        self.values["round_times"][rows, column] = self.steps[rows] * total + transfers
        self.values["edge_times"][rows, column] = self.steps[rows] * step.edge_s
        self.known[rows, column] = True


class FleetCandidates(CandidateSource):
    """The round's candidates read from the fleet's forecast (``Candidates`` over it)."""

    def __init__(self, forecast: FleetForecast, ids: np.ndarray, budgets: np.ndarray, samples: np.ndarray,
                 edges: np.ndarray, label_counts: np.ndarray, device: Callable[[int], Device]) -> None:
        self.forecast, self.ids, self.budgets, self.samples, self.edges = forecast, ids, budgets, samples, edges
        self.label_counts, self.device = label_counts, device

    def columns(self) -> Candidates:
        return Candidates(self, self.ids, self.budgets, self.samples, self.edges, self.label_counts,
                          self.forecast.num_units)

    def per_cut(self, name: str, rows: np.ndarray, cuts: Sequence[int]) -> np.ndarray:
        return self.forecast.read(name, self.ids[rows], cuts)

    def candidate(self, row: int) -> Candidate:
        i = int(self.ids[row])
        figures = {name: _Figure(self.forecast, name, i) for name in FIELDS}
        return Candidate(device=self.device(i), budget=int(self.budgets[row]), **figures, samples=int(self.samples[row]),
                         label_counts=tuple(self.label_counts[row].tolist()), edge=int(self.edges[row]))


class _Figure(PerCut):
    """One device's figure per cut, read from the fleet's forecast: nothing is stored per device."""

    __slots__ = ("_forecast", "_field", "_device")

    def __init__(self, forecast: FleetForecast, field: str, device: int) -> None:
        self._forecast, self._field, self._device = forecast, field, device

    def __len__(self) -> int:
        return self._forecast.num_units

    def __getitem__(self, index):
        if type(index) is int and 0 <= index < self._forecast.num_units:  # the common read, kept short
            return self._at(index)
        return super().__getitem__(index)

    def _at(self, index: int):
        return self._forecast.at(self._field, index + 1, self._device)

    @classmethod
    def gather(cls, figures: Sequence["_Figure"]) -> np.ndarray:
        """The figures' rows at once (figures of one field and forecast; another mix is read one by one)."""
        if len({(id(f._forecast), f._field) for f in figures}) != 1:
            return super().gather(figures)
        first = figures[0]
        return first._forecast.read(first._field, np.array([f._device for f in figures], dtype=np.int64),
                                    range(1, first._forecast.num_units + 1))
