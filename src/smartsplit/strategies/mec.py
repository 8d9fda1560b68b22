"""The MEC manager's time-evolving statistical importance: where devices' updates disagree, cut shallower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.strategies.base import StepObserver


class UpdateSketcher:
    """Fixed random coordinates of each unit's parameters, so per-device updates can be compared cheaply."""

    def __init__(self, model: nn.Sequential | None = None, coords_per_unit: int = 1024, seed: int = 0) -> None:
        if coords_per_unit < 1:
            raise SmartSplitError(f"coords_per_unit must be at least 1, got {coords_per_unit}")
        self.coords_per_unit = coords_per_unit
        self.seed = seed
        self.model_units = len(model) if model is not None else None  # None: units are laid out as first seen
        # per 1-based unit: (param index, flat index within that param), sorted, and the unit's param sizes
        self.positions: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.sizes: dict[int, tuple[int, ...]] = {}
        for index, unit in enumerate(model or [], start=1):
            self._layout(index, unit)

    def layout(self, model: nn.Sequential) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Each unit's sketched coordinates in ``model``, (parameter, flat index) arrays: what a role that must not
        know the seed needs to sketch the same coordinates (``from_layout``)."""
        for index, unit in enumerate(model, start=1):
            if index not in self.positions:
                self._layout(index, unit)
        return {index: self.positions[index] for index in range(1, len(model) + 1)}

    @classmethod
    def from_layout(cls, model: nn.Sequential, positions: dict[int, tuple[np.ndarray, np.ndarray]]) -> UpdateSketcher:
        """A sketcher of ``model`` at the given coordinates (``layout``'s), with no seed of its own."""
        sketcher = cls(coords_per_unit=max((len(flat) for _, flat in positions.values()), default=1))
        sketcher.model_units = len(model)
        for index, unit in enumerate(model, start=1):
            param, flat = positions[index]
            sizes = tuple(p.numel() for p in unit.parameters())
            if len(param) != len(flat) or any(not (0 <= i < len(sizes) and 0 <= f < sizes[i])
                                              for i, f in zip(param.tolist(), flat.tolist())):
                raise SmartSplitError(f"sketch coordinates of unit {index} fall outside its parameters")
            sketcher.positions[index] = (np.asarray(param, dtype=np.int64), np.asarray(flat, dtype=np.int64))
            sketcher.sizes[index] = sizes
        return sketcher

    def _layout(self, index: int, unit: nn.Module) -> None:
        """The unit's sketched coordinates: seeded by (seed, unit index), so every role that sketches agrees."""
        sizes = tuple(p.numel() for p in unit.parameters())
        total = sum(sizes)
        rng = np.random.default_rng([self.seed, index])
        flat = np.sort(rng.choice(total, size=min(self.coords_per_unit, total), replace=False)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        param = np.searchsorted(starts, flat, side="right") - 1
        self.positions[index] = (param.astype(np.int64), (flat - starts[param]).astype(np.int64))
        self.sizes[index] = sizes

    def _read(self, index: int, unit: nn.Module, grad: bool) -> np.ndarray:
        if index not in self.positions:
            if self.model_units is not None or index < 1:
                raise SmartSplitError(f"unit {index} is not in the sketched model (units 1..{len(self.positions)})")
            self._layout(index, unit)
        params = list(unit.parameters())
        if tuple(p.numel() for p in params) != self.sizes[index]:
            raise SmartSplitError(f"unit {index} does not have the parameter shapes it was sketched with")
        param, flat = self.positions[index]
        out = np.zeros(len(flat), dtype=np.float64)
        for i in np.unique(param):
            tensor = params[i].grad if grad else params[i].data
            if tensor is None:
                continue
            mask = param == i
            idx = torch.as_tensor(flat[mask], device=tensor.device)
            out[mask] = tensor.detach().reshape(-1)[idx].double().cpu().numpy()
        return out

    def grad_sketch(self, index: int, unit: nn.Module) -> np.ndarray:
        """The unit's current ``.grad`` at the sketched positions (0 where a grad is None)."""
        return self._read(index, unit, grad=True)

    def weight_sketch(self, index: int, unit: nn.Module) -> np.ndarray:
        """The unit's weights at the sketched positions."""
        return self._read(index, unit, grad=False)


@dataclass
class StepSketches:
    """One device's gradient sketches of one unit over a round, one per local step, kept as their sum, the sum of
    their squared norms and their count (what a device would send the edge: a vector and two numbers)."""

    total: np.ndarray
    squares: float = 0.0
    steps: int = 0

    @classmethod
    def of(cls, sketches: Sequence[np.ndarray]) -> StepSketches:
        stats = cls(np.zeros(len(sketches[0])) if sketches else np.zeros(0))
        for g in sketches:
            stats.add(g)
        return stats

    def add(self, sketch: np.ndarray) -> None:
        g = np.asarray(sketch, dtype=np.float64).reshape(-1)
        self.total = self.total + g if self.total.shape == g.shape else g.copy()
        self.squares += float(g @ g)
        self.steps += 1

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.steps, 1)

    @property
    def noise(self) -> float | None:
        """E||mean - its expectation||^2 were the steps independent draws: the steps' variance over their count.
        None below two steps."""
        if self.steps < 2:
            return None
        m = self.mean
        variance = max(self.squares / self.steps - float(m @ m), 0.0) * self.steps / (self.steps - 1)
        return variance / self.steps


def importance(stats: Sequence[StepSketches], weights: Sequence[float] | None = None) -> float | None:
    """How much more the devices' mean step gradients of one unit disagree than sampling noise alone would make
    them disagree, in [0, 1] (a one-way analysis of variance between devices):
    ``1 - W / B`` clamped at 0, with ``B`` the weighted spread of the devices' mean gradients around their weighted
    mean and ``W`` the spread expected were every device drawing its steps from one distribution,
    ``sum_k w_k (1 - w_k) s_k^2 / T_k`` (``s_k^2``: the variance of device k's step gradients, ``T_k`` its steps).

    Why it holds under SGD: ``W`` treats a device's steps as independent. Consecutive SGD gradients are
    anti-correlated (a step that overshoots is corrected by the next), so the true noise of a mean is at most
    ``s^2 / T`` and ``W`` over-states it: devices with the same data score 0, not a spurious disagreement. The
    within-device variance also holds the drift of the gradient along the local trajectory, which again makes
    ``W`` larger, never smaller. So a high score means data that really disagree. None with fewer than two
    devices, a device with fewer than two steps, or no spread at all."""
    usable = [s for s in stats if s.steps >= 2]
    if len(usable) < 2 or len(usable) < len(stats):
        return None
    w = np.ones(len(usable)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(usable),) or np.any(w < 0) or w.sum() <= 0:
        raise SmartSplitError("importance weights must be one non-negative number per device, not all zero")
    w = w / w.sum()
    means = np.stack([s.mean for s in usable])
    centre = w @ means
    between = float(w @ np.einsum("kd,kd->k", means - centre, means - centre))
    if between <= 0.0:
        return None
    expected = float(np.sum(w * (1 - w) * np.array([s.noise for s in usable])))
    return min(max(1.0 - expected / between, 0.0), 1.0)


class GradientSketches(StepObserver):
    """The MEC manager's view of a split step: each unit's gradient at fixed sketched coordinates."""

    def __init__(self, sketcher: UpdateSketcher) -> None:
        self.sketcher = sketcher

    def observe(self, unit: int, module: nn.Module) -> np.ndarray:
        return self.sketcher.grad_sketch(unit, module)


def step_sketches(observations: Sequence[tuple[int, int, np.ndarray]]) -> dict[int, StepSketches]:
    """One device's observations of a round (``(step, unit, sketch)``, from the device and the edge) as
    ``StepSketches`` per unit, each summed in step order."""
    out: dict[int, StepSketches] = {}
    for _, unit, sketch in sorted(observations, key=lambda o: o[0]):
        out.setdefault(unit, StepSketches(np.zeros(0))).add(sketch)
    return out


class MecManager:
    """Scores units by how much devices' updates of them disagree and nudges cuts one unit at a time, with hysteresis.

    ``state_dict``/``load_state_dict`` carry what it learned across a resume. ``observer()`` is what the roles
    holding the units run after every split step (``seed`` fixes the sketched coordinates).
    """

    def __init__(
        self, num_units: int, high: float = 0.6, low: float = 0.3, smoothing: float = 0.5, cooldown: int = 1,
        seed: int = 0,
    ) -> None:
        if num_units < 1:
            raise SmartSplitError(f"num_units must be at least 1, got {num_units}")
        if not high > low:
            raise SmartSplitError(f"high must be above low (hysteresis); got high={high}, low={low}")
        if not 0.0 <= smoothing < 1.0:
            raise SmartSplitError(f"smoothing must be in [0, 1), got {smoothing}")
        if cooldown < 0:
            raise SmartSplitError(f"cooldown must be non-negative, got {cooldown}")
        self.num_units = num_units
        self.high = high
        self.low = low
        self.smoothing = smoothing
        self.cooldown = cooldown
        self.scores: dict[int, float] = {}
        self.rounds = 0  # calls to update()
        self.last_move: dict[int, tuple[int, int]] = {}  # device id -> (round of its last move, direction -1/+1)
        self.sketcher = UpdateSketcher(seed=seed)

    def observer(self) -> GradientSketches:
        return GradientSketches(self.sketcher)

    def update(self, per_device: dict[int, dict[int, StepSketches]]) -> dict[int, float]:
        """Score each unit with the importance of the devices' step gradients of it this round (``importance``);
        smooth (EMA) over rounds. ``per_device[device][unit]``: that device's step sketches of that unit."""
        self.rounds += 1
        for unit in range(1, self.num_units + 1):
            score = importance([units[unit] for _, units in sorted(per_device.items()) if unit in units])
            if score is None:
                continue
            old = self.scores.get(unit)
            self.scores[unit] = score if old is None else self.smoothing * old + (1.0 - self.smoothing) * score
        return dict(self.scores)

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores), "rounds": self.rounds,
                "last_move": {device: list(move) for device, move in self.last_move.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.scores = {int(k): float(v) for k, v in state["scores"].items()}
        self.rounds = int(state["rounds"])
        self.last_move = {int(k): (int(v[0]), int(v[1])) for k, v in state["last_move"].items()}

    def _allowed(self, device_id: int, direction: int) -> bool:
        last = self.last_move.get(device_id)
        return last is None or last[1] == direction or self.rounds - last[0] > self.cooldown

    def adjust(self, device_id: int, cut: int, feasible_cuts: tuple[int, ...], accept=lambda new_cut: True) -> int:
        """One unit shallower when unit ``cut`` scores above ``high``; else one deeper when unit ``cut+1`` scores below
        ``low``; else ``cut``. A move opposite to the device's last one waits until more than ``cooldown`` rounds
        (calls to update()) have passed since it. Unscored units never trigger a move. ``accept(new_cut)`` lets the
        caller refuse a move (it is then not remembered for the cooldown)."""
        feasible = set(feasible_cuts)
        last_device, first_edge = self.scores.get(cut), self.scores.get(cut + 1)
        if last_device is not None and last_device > self.high:
            if cut - 1 >= 1 and cut - 1 in feasible and self._allowed(device_id, -1) and accept(cut - 1):
                self.last_move[device_id] = (self.rounds, -1)
                return cut - 1
            return cut  # never pull a low unit onto a device whose own last unit disagrees
        if first_edge is not None and first_edge < self.low:
            if cut + 1 <= self.num_units and cut + 1 in feasible and self._allowed(device_id, +1) and accept(cut + 1):
                self.last_move[device_id] = (self.rounds, +1)
                return cut + 1
        return cut
