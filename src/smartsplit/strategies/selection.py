"""Selection helpers strategies share: uniform sampling, Oort-style utility and penalty, label coverage, and what
the rounds seen so far say about each device (its loss and its speed against the prediction)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.records import DeviceReport
from smartsplit.strategies.base import Candidate, Candidates, PerCut


def sample_eligible(eligible: Sequence[Candidate], k: int, rng: np.random.Generator) -> list[Candidate]:
    """``k`` candidates chosen uniformly without replacement, in a seeded, order-stable way."""
    if len(eligible) <= k:
        return list(eligible)
    chosen = rng.choice(len(eligible), size=k, replace=False)
    return [eligible[i] for i in sorted(chosen)]


def statistical_utility(samples: int, loss_rms: float) -> float:
    """How much a device's data would still teach (Oort's |B| * sqrt(mean loss^2))."""
    return float(samples) * float(loss_rms)


def system_penalty(time_s: float, preferred_s: float, alpha: float = 2.0) -> float:
    """1 for a round within the preferred duration, ``(preferred / time) ** alpha`` beyond it."""
    if time_s <= preferred_s or time_s <= 0:
        return 1.0
    return float((preferred_s / time_s) ** alpha)


MIN_SHARE = 0.05  # a class below this share of a device's samples is a stray, not coverage


def present_classes(label_counts: Sequence[int], min_share: float = MIN_SHARE) -> frozenset[int]:
    """Classes that make up at least ``min_share`` of a device's samples (a stray example is not coverage)."""
    total = sum(label_counts)
    return frozenset(j for j, n in enumerate(label_counts) if n > 0 and n >= min_share * total)


def label_matrix(label_counts: Sequence[Sequence[int]]) -> np.ndarray:
    """Devices' label counts as one array, [device, class] (shorter rows padded with zeros: absent classes)."""
    widths = {len(c) for c in label_counts}
    if len(widths) == 1:
        return np.array(label_counts, dtype=np.int64).reshape(len(label_counts), widths.pop())
    width = max(widths, default=0)
    out = np.zeros((len(label_counts), width), dtype=np.int64)
    for row, counts in enumerate(label_counts):
        out[row, : len(counts)] = counts
    return out


def coverage_bonuses(counts: np.ndarray, weight: float, covered: np.ndarray | None = None) -> np.ndarray:
    """``coverage_bonus`` of many devices at once (rows of ``counts``, a ``label_matrix``), the classes
    ``covered`` (a mask over the columns; none by default) taken: the same arithmetic, so the same values."""
    totals = counts.sum(axis=1)
    new = (counts > 0) & (counts >= MIN_SHARE * totals[:, None])
    if covered is not None:
        new &= ~covered
    held = np.where(new, counts, 0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bonus = weight * held / totals
    return np.where((totals <= 0) | (weight == 0), 0.0, bonus)


def coverage_bonus(
    label_counts: Sequence[int],
    covered: set[int] | frozenset[int],
    weight: float,
    present: frozenset[int] | None = None,  # present_classes(label_counts), if already computed
) -> float:
    """``weight`` x the share of the device's samples in classes it holds and the chosen devices lack."""
    total = sum(label_counts)
    if total <= 0 or weight == 0:
        return 0.0
    new = (present_classes(label_counts) if present is None else present) - covered
    return weight * sum(label_counts[j] for j in new) / total


def predicted_times(c: Candidate) -> tuple[Sequence[float], Sequence[float]]:
    """The engine's predicted round time and edge time per cut (step times and no edge work if not given)."""
    rounds = c.round_times or c.step_times
    return rounds, c.edge_times if c.edge_times else (0.0,) * len(rounds)


class DeviceHistory:
    """What the server learned from past rounds: each device's last loss and its measured speed.

    Speed factor: an EMA of (observed device-side seconds) / (predicted device-side seconds) for the cut the
    device was given, where device-side = round time minus edge compute, and observed = the report's
    ``compute_s + comm_s`` (the same components: its forward/backward, its link, its model transfers; queueing
    at the edge and memory pauses are left out, they are not the device's speed). Only rounds a device ran
    cleanly at its planned cut count (no out-of-memory, no pause, no cut move), since a cut-short round says
    nothing about speed. Factor 1 until measured.
    """

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.loss_rms: dict[int, float] = {}  # device id -> RMS of its last round's training loss
        self.speed: dict[int, float] = {}  # device id -> measured / predicted device-side time
        self.planned: dict[int, tuple[int, float]] = {}  # device id -> (cut, predicted device-side s) this round
        self.latest_loss: float | None = None  # the highest loss_rms reported in the latest round

    def times(self, c: Candidate) -> tuple[Sequence[float], Sequence[float]]:
        """Round time (device side scaled by the speed factor) and edge time, per cut (each computed when read)."""
        rounds, edge = predicted_times(c)
        f = self.speed.get(c.device.id, 1.0)
        return PerCut(len(rounds), lambda cut: f * (rounds[cut - 1] - edge[cut - 1]) + edge[cut - 1]), edge

    def fastest(self, candidates: Sequence[Candidate], fits: np.ndarray) -> np.ndarray:
        """Each candidate's fastest round over the cuts ``fits`` allows (as ``times`` scales them), all at once."""
        candidates = Candidates.of(candidates)
        if not len(candidates):
            return np.zeros(0)
        rounds, edge = (candidates.figure(name).astype(float) for name in ("round_times", "edge_times"))
        speed = self.speed
        factor = np.array([speed.get(i, 1.0) for i in candidates.ids.tolist()])[:, None]
        return np.where(fits, factor * (rounds - edge) + edge, np.inf).min(axis=1)

    def plan(self, c: Candidate, cut: int) -> None:
        rounds, edge = predicted_times(c)
        self.planned[c.device.id] = (cut, rounds[cut - 1] - edge[cut - 1])

    def observe(self, reports: Sequence[DeviceReport]) -> None:
        losses = []
        for r in reports:
            device = r.device
            if r.loss_rms is not None:
                self.loss_rms[device] = float(r.loss_rms)
                losses.append(float(r.loss_rms))
            cut, predicted = self.planned.get(device, (None, 0.0))
            clean = (
                r.steps and not r.oom_events and not r.pauses and not r.dropped_out
                and r.cut == cut and r.final_cut == cut
            )
            if clean and predicted > 0:
                ratio = float(np.clip((r.compute_s + r.comm_s) / predicted, 0.1, 10.0))
                old = self.speed.get(device)
                self.speed[device] = ratio if old is None else self.smoothing * old + (1 - self.smoothing) * ratio
        if losses:
            self.latest_loss = max(losses)
        self.planned.clear()

    def state_dict(self) -> dict:
        return {"loss_rms": dict(self.loss_rms), "speed": dict(self.speed), "latest_loss": self.latest_loss}

    def load_state_dict(self, state: dict) -> None:
        self.loss_rms = {int(k): float(v) for k, v in state["loss_rms"].items()}
        self.speed = {int(k): float(v) for k, v in state["speed"].items()}
        self.latest_loss = state["latest_loss"]
