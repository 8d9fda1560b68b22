"""The MEC manager's time-evolving statistical importance: where devices' updates disagree, cut shallower."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from smartsplit.errors import SmartSplitError


class UpdateSketcher:
    """Fixed random coordinates of each unit's parameters, so per-device updates can be compared cheaply."""

    def __init__(self, model: nn.Sequential, coords_per_unit: int = 1024, seed: int = 0) -> None:
        if coords_per_unit < 1:
            raise SmartSplitError(f"coords_per_unit must be at least 1, got {coords_per_unit}")
        self.coords_per_unit = coords_per_unit
        self.seed = seed
        # per 1-based unit: (param index, flat index within that param), sorted, and the unit's param sizes
        self.positions: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.sizes: dict[int, tuple[int, ...]] = {}
        for index, unit in enumerate(model, start=1):
            sizes = tuple(p.numel() for p in unit.parameters())
            total = sum(sizes)
            rng = np.random.default_rng([seed, index])
            flat = np.sort(rng.choice(total, size=min(coords_per_unit, total), replace=False)).astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            param = np.searchsorted(starts, flat, side="right") - 1
            self.positions[index] = (param.astype(np.int64), (flat - starts[param]).astype(np.int64))
            self.sizes[index] = sizes

    def _read(self, index: int, unit: nn.Module, grad: bool) -> np.ndarray:
        if index not in self.positions:
            raise SmartSplitError(f"unit {index} is not in the sketched model (units 1..{len(self.positions)})")
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


def disagreement(
    updates: Sequence[np.ndarray], weights: Sequence[float] | None = None, noise: Sequence[float] | None = None
) -> float | None:
    """Normalised variance of per-device updates of one unit, in [0, 1]: weighted mean of ||u_k - mean||^2
    divided by the weighted mean of ||u_k||^2 (0: all devices agree; 1: they cancel out).

    ``noise[k]`` estimates E||n_k||^2, the part of device k's update that is sampling noise. Devices drawing
    from one distribution still disagree by that much (the weighted spread of independent noise is
    sum_k w_k (1 - w_k) noise_k), so it is subtracted: what is left is disagreement from their data.
    None with fewer than 2 updates or all zero."""
    if len(updates) < 2:
        return None
    u = np.stack([np.asarray(x, dtype=np.float64).reshape(-1) for x in updates])
    w = np.ones(len(updates)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or np.any(w < 0) or w.sum() <= 0:
        raise SmartSplitError("disagreement weights must be one non-negative number per update, not all zero")
    w = w / w.sum()
    power = float(w @ np.einsum("kd,kd->k", u, u))
    if power <= 0.0:
        return None
    mean = w @ u
    spread = float(w @ np.einsum("kd,kd->k", u - mean, u - mean))
    if noise is not None:
        spread -= float(np.sum(w * (1 - w) * np.asarray(noise, dtype=np.float64)))
    return min(max(spread / power, 0.0), 1.0)


def split_halves(update: np.ndarray) -> tuple[np.ndarray, float | None]:
    """A device's update and its noise estimate from ``update``: either one vector (no estimate) or two rows,
    the sums over its even and its odd local steps. Their difference has the noise of the whole sum and
    none of its signal, so ||even - odd||^2 estimates E||noise||^2."""
    update = np.asarray(update, dtype=np.float64)
    if update.ndim == 2 and update.shape[0] == 2:
        return update[0] + update[1], float(np.sum((update[0] - update[1]) ** 2))
    return update.reshape(-1), None


class MecManager:
    """Scores units by how much devices' updates of them disagree and nudges cuts one unit at a time, with hysteresis.

    Plain attributes only, so it pickles for resume.
    """

    def __init__(
        self, num_units: int, high: float = 0.6, low: float = 0.3, smoothing: float = 0.5, cooldown: int = 1
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

    def update(self, per_device: dict[int, dict[int, np.ndarray]]) -> dict[int, float]:
        """Score each unit with the disagreement of the devices that updated it this round; smooth (EMA) over rounds.

        ``per_device[device][unit]`` is a device's update of a unit: one vector, or two rows (sums over even and
        odd local steps), in which case the disagreement that sampling noise alone would cause is discounted."""
        self.rounds += 1
        for unit in range(1, self.num_units + 1):
            halves = [split_halves(units[unit]) for _, units in sorted(per_device.items()) if unit in units]
            noise = [n for _, n in halves]
            score = disagreement([u for u, _ in halves], noise=None if None in noise else noise)
            if score is None:
                continue
            old = self.scores.get(unit)
            self.scores[unit] = score if old is None else self.smoothing * old + (1.0 - self.smoothing) * score
        return dict(self.scores)

    def _allowed(self, device_id: int, direction: int) -> bool:
        last = self.last_move.get(device_id)
        return last is None or last[1] == direction or self.rounds - last[0] > self.cooldown

    def adjust(self, device_id: int, cut: int, feasible_cuts: tuple[int, ...]) -> int:
        """One unit shallower when unit ``cut`` scores above ``high``; else one deeper when unit ``cut+1`` scores below
        ``low``; else ``cut``. A move opposite to the device's last one waits until more than ``cooldown`` rounds
        (calls to update()) have passed since it. Unscored units never trigger a move."""
        feasible = set(feasible_cuts)
        last_device, first_edge = self.scores.get(cut), self.scores.get(cut + 1)
        if last_device is not None and last_device > self.high:
            if cut - 1 >= 1 and cut - 1 in feasible and self._allowed(device_id, -1):
                self.last_move[device_id] = (self.rounds, -1)
                return cut - 1
            return cut  # never pull a low unit onto a device whose own last unit disagrees
        if first_edge is not None and first_edge < self.low:
            if cut + 1 <= self.num_units and cut + 1 in feasible and self._allowed(device_id, +1):
                self.last_move[device_id] = (self.rounds, +1)
                return cut + 1
        return cut
