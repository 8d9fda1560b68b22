"""The on-device manager: the cheapest plan that fits the memory the device may use right now."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from smartsplit.fleet.clock import BACKWARD_FLOPS
from smartsplit.memory.model import MemoryBreakdown, Segments, activation_bytes, activation_peaks, device_memory
from smartsplit.memory.planner import plan_segments
from smartsplit.models.profile import ModelProfile


@dataclass(frozen=True)
class DevicePlan:
    """How a device runs one local step at a cut."""

    @property
    def peak_bytes(self) -> int:
        return self.memory.total

    cut: int
    micro_batch: int
    segments: Segments  # checkpointed segments of units 1..cut
    memory: MemoryBreakdown  # predicted device peak, by kind, at this micro-batch
    held_bytes: int  # saved activations held at the end of the forward (the rest of the peak is recompute)
    recompute_flops: int  # per logical batch
    compute_s: float  # device compute per logical batch, recompute included
    recompute_s: float
    round_trips: int  # micro-batches, each one a round trip to the edge


MAX_TIGHTENINGS = 8


class PlanOption(NamedTuple):
    """One micro-batch size's cheapest way to fit a budget at a cut; nothing in it depends on a device's speed."""

    micro_batch: int
    round_trips: int
    profile: ModelProfile  # at the micro-batch
    segments: Segments
    memory: MemoryBreakdown
    recompute_flops: float  # per logical batch
    work_flops: float  # forward and backward per logical batch, recompute excluded


def fastest(options: Sequence[PlanOption], flops_per_s: np.ndarray, round_trip_s: float) -> np.ndarray:
    """For each speed in ``flops_per_s``, the index of the fastest option (the first of equals): compute plus
    recompute seconds plus a link round trip per extra micro-batch. Every device's plan is chosen here, one
    device or a fleet at once."""
    work = np.array([o.work_flops for o in options], dtype=float)[:, None]
    recompute = np.array([o.recompute_flops for o in options], dtype=float)[:, None]
    trips = np.array([(o.round_trips - 1) * round_trip_s for o in options], dtype=float)[:, None]
    return np.argmin(work / flops_per_s + recompute / flops_per_s + trips, axis=0)


class PlanMemo:
    """What planning shares across the devices of one model, batch and optimizer: the plain (nothing recomputed)
    memory of each cut at each micro-batch size, and the activations each segmentation holds. Pure functions of
    the profile, so sharing them changes no plan; it spares a fleet of thousands from computing them per device."""

    def __init__(self) -> None:
        self._plain: dict[tuple, MemoryBreakdown] = {}
        self._held: dict[tuple, int] = {}
        self._options: dict[tuple, list] = {}

    def plain(self, profile: ModelProfile, cut: int, slots: int, rounds: int) -> MemoryBreakdown:
        key = (profile.input_shape, profile.batch, profile.dtype, cut, slots, rounds)
        if key not in self._plain:
            self._plain[key] = device_memory(profile, cut, slots=slots, micro_batches=rounds)
        return self._plain[key]

    def options(self, key: tuple, search: Callable[[], list]) -> list:
        """``search()``'s ways to fit a budget (they do not depend on the device's speed), found once per key."""
        if key not in self._options:
            self._options[key] = search()
        return self._options[key]

    def held(self, profile: ModelProfile, cut: int, segments: Segments) -> int:
        key = (profile.input_shape, profile.batch, profile.dtype, cut, segments)
        if key not in self._held:
            self._held[key] = activation_peaks(profile, cut, segments)[0]
        return self._held[key]


def micro_batch_sizes(batch: int) -> list[int]:
    """Candidate micro-batch sizes: the batch, then halving down to 1."""
    sizes, m = [], batch
    while m >= 1:
        sizes.append(m)
        m = m // 2 if m > 1 else 0
    return sizes


def quantize(budget: int, resolution: int) -> int:
    """``budget`` rounded down to a multiple of 1/``resolution`` of its power of two (at most 1/``resolution``
    less; 0: unchanged). Plans for the rounded budget fit the real one; devices whose budgets round alike share
    their plans' segmentation search."""
    if resolution <= 0 or budget <= resolution:
        return budget
    step = max(1, (1 << (budget.bit_length() - 1)) // resolution)
    return budget // step * step


class OnDeviceManager:
    """Plans for one model, batch size and optimizer; plans are cached per (cut, budget).

    ``profile_at(m)`` returns the model's measured profile at micro-batch ``m``. ``round_trip_s`` is the time
    one extra micro-batch adds on the link (two messages' latency). ``checkpointing=False`` allows only the
    plain plan (whole batch, nothing recomputed), as the baselines run. Managers of one model, batch and
    optimizer may share a ``memo`` (``PlanMemo``) of what does not depend on the device. ``resolution``: budgets
    are planned for rounded down (``quantize``), so plans are shared by devices whose budgets round alike.
    """

    def __init__(
        self,
        profile_at: Callable[[int], ModelProfile],
        batch: int,
        slots: int,
        flops_per_s: float,
        round_trip_s: float,
        checkpointing: bool = True,
        memo: PlanMemo | None = None,
        resolution: int = 0,
    ) -> None:
        self.profile_at = profile_at
        self.batch = batch
        self.slots = slots
        self.flops_per_s = flops_per_s
        self.round_trip_s = round_trip_s
        self.checkpointing = checkpointing
        self.memo = memo if memo is not None else PlanMemo()
        self.resolution = resolution
        self._model_key: tuple | None = None
        self._plans: dict[tuple[int, int, bool], DevicePlan | None] = {}

    def plan(self, cut: int, budget: int) -> DevicePlan | None:
        """The fastest plan at ``cut`` whose predicted peak is at most ``budget``; None if none fits."""
        budget = quantize(budget, self.resolution)
        key = (cut, budget, self.checkpointing)
        if key not in self._plans:
            self._plans[key] = self._best(cut, budget)
        return self._plans[key]

    def deepest_fitting_cut(self, max_cut: int, budget: int) -> DevicePlan | None:
        """The plan at the deepest cut ``<= max_cut`` that fits ``budget`` (where a device moves when squeezed)."""
        for cut in range(max_cut, 0, -1):
            plan = self.plan(cut, budget)
            if plan is not None:
                return plan
        return None

    def _best(self, cut: int, budget: int) -> DevicePlan | None:
        options = self.options(cut, budget)
        if not options:
            return None
        best = options[int(fastest(options, np.array([self.flops_per_s]), self.round_trip_s)[0])]
        recompute_time = best.recompute_flops / self.flops_per_s
        return DevicePlan(
            cut=cut,
            micro_batch=best.micro_batch,
            segments=best.segments,
            memory=best.memory,
            held_bytes=self.memo.held(best.profile, cut, best.segments),
            recompute_flops=int(best.recompute_flops),
            compute_s=best.work_flops / self.flops_per_s + recompute_time,
            recompute_s=recompute_time,
            round_trips=best.round_trips,
        )

    def options(self, cut: int, budget: int) -> list[PlanOption]:
        """Every micro-batch size's cheapest way to fit ``budget`` (already rounded) at ``cut``; none depends on
        the device's speed, so managers sharing a memo find them once for all their devices. Every budget at or
        above ``roomy(cut)`` gets the same options (each micro-batch's plain plan), found once."""
        if self._model_key is None:
            head = self.profile_at(self.batch)
            self._model_key = (head.input_shape, head.dtype, self.batch, self.slots)
        key = min(budget, self.roomy(cut))
        return self.memo.options((*self._model_key, self.checkpointing, cut, key), lambda: self._search(cut, key))

    def roomy(self, cut: int) -> int:
        """The smallest budget in which every micro-batch size's plain plan (nothing recomputed) fits at ``cut``:
        from there up, the options do not depend on the budget."""
        sizes = micro_batch_sizes(self.batch) if self.checkpointing else [self.batch]
        return max(self.memo.plain(self.profile_at(m), cut, self.slots, math.ceil(self.batch / m)).total for m in sizes)

    def _search(self, cut: int, budget: int) -> list[PlanOption]:
        options = []
        for m in micro_batch_sizes(self.batch) if self.checkpointing else [self.batch]:
            profile = self.profile_at(m)
            rounds = math.ceil(self.batch / m)
            memory = self.memo.plain(profile, cut, self.slots, rounds)
            segments, recompute = (), 0
            if memory.total > budget:
                if not self.checkpointing:
                    continue
                found = self._segments(profile, cut, budget, rounds, memory)
                if found is None:
                    continue
                segments, recompute, memory = found
            scale = self.batch / m  # FLOPs are profiled per micro-batch
            work = (1 + BACKWARD_FLOPS) * profile.flops(1, cut) * scale  # device_compute_s's FLOPs
            options.append(PlanOption(m, rounds, profile, segments, memory, recompute * scale, work))
        return options

    def _segments(self, profile: ModelProfile, cut: int, budget: int, rounds: int, plain: MemoryBreakdown):
        """The cheapest segmentation whose whole predicted peak fits ``budget``.

        The segmentation search bounds the saved activations; the rest of the peak (what each unit needs while
        it runs, recomputation included) depends on the segments, so the activation bound is tightened by the
        overshoot until the whole peak fits.
        """
        limit = activation_bytes(profile, cut) - (plain.total - budget)
        for _ in range(MAX_TIGHTENINGS):
            segmentation = plan_segments(profile, cut, limit)
            if segmentation is None:
                return None
            memory = device_memory(profile, cut, slots=self.slots, segments=segmentation.segments, micro_batches=rounds)
            if memory.total <= budget:
                return segmentation.segments, segmentation.recompute_flops, memory
            limit = min(limit, segmentation.activation_bytes) - (memory.total - budget)
        return None
