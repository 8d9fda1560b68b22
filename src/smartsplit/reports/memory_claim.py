"""The memory headline: the meter's peak of training a whole model on the device against the meter's peak of one
device step under the on-device manager's plan for a budget of a fraction (1/100) of it.

(a) the meter's peak of one whole-model step (cut L, whole batch, nothing recomputed); budget = (a) / divisor;
the on-device manager (``OnDeviceManager.deepest_fitting_cut``) picks the deepest cut and the plan (micro-batch,
checkpointed segments) whose predicted peak fits the budget; (b) the meter's peak of one device step under that
plan. Both figures come from the memory meter (``smartsplit.meter.heap``), never from the memory model; the
model's prediction is kept beside them, labelled as such. ``benchmarks/device_memory.py`` and ``smartsplit
reproduce`` both call :func:`measure_memory_claim`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from smartsplit.memory.ondevice import DevicePlan, OnDeviceManager
from smartsplit.meter.heap import HeapMeter
from smartsplit.models.profile import BACKWARD_FLOPS, ProfileCache
from smartsplit.models.zoo import build_model, default_input_shape

OPTIMIZER = ("sgd", 0.01, 0.9)  # SGD with momentum: one optimizer slot per parameter
SLOTS = 1


@dataclass(frozen=True)
class MemoryClaim:
    """One model's whole-model peak (a) and device peak under the plan (b), both measured by the meter."""

    model: str
    width: float
    units: int
    batch: int
    divisor: float
    whole_bytes: int  # (a), measured
    whole_predicted_bytes: int  # the memory model's figure for (a), for comparison only
    budget_bytes: int
    plan: DevicePlan | None  # None: no plan fits the budget at any cut
    device_bytes: int | None  # (b), measured under the plan
    plan_ms: float
    recompute_flops_pct: float | None  # extra forward FLOPs over the step's forward + backward FLOPs at the cut

    @property
    def ratio(self) -> float | None:
        """(a)/(b): how many times less memory the device needs under the plan."""
        return self.whole_bytes / self.device_bytes if self.device_bytes else None

    @property
    def fits(self) -> bool:
        """The measured peak under the plan is within the budget."""
        return self.device_bytes is not None and self.device_bytes <= self.budget_bytes


def plan_text(plan: DevicePlan) -> str:
    """``cut 2, micro-batch 1 (32 round trips), checkpointed 1-3,4``."""
    return f"cut {plan.cut}, micro-batch {plan.micro_batch} ({plan.round_trips} round trips), checkpointed {segments_text(plan)}"


def segments_text(plan: DevicePlan) -> str:
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in plan.segments) or "none"


def measure_memory_claim(name: str, model: nn.Sequential, shape: tuple[int, ...], meter: HeapMeter, *, width: float = 1.0,
                         batch: int = 32, divisor: float = 100.0, flops_per_s: float = 10e9,
                         round_trip_s: float = 0.02) -> MemoryClaim:
    """Measure (a), plan for (a)/``divisor`` and measure (b) for ``model`` (a chain of units) at ``batch``."""
    cache = ProfileCache(meter, OPTIMIZER)
    profile_at = lambda m: cache.get(name, model, shape, m)  # noqa: E731
    units = len(model)
    whole = meter.step_peak(model, shape, batch, optimizer=OPTIMIZER, to_edge=False)
    budget = int(whole / divisor)
    manager = OnDeviceManager(profile_at, batch=batch, slots=SLOTS, flops_per_s=flops_per_s, round_trip_s=round_trip_s)
    whole_predicted = manager.plan(units, 2**62).peak_bytes
    started = time.perf_counter()
    plan = manager.deepest_fitting_cut(units, budget)
    plan_ms = 1e3 * (time.perf_counter() - started)
    device, flops_pct = None, None
    if plan is not None:
        device = meter.step_peak(model[: plan.cut], shape, batch, micro_batch=plan.micro_batch, segments=plan.segments,
                                 optimizer=OPTIMIZER, to_edge=plan.cut < units)
        flops_pct = 100 * plan.recompute_flops / ((1 + BACKWARD_FLOPS) * profile_at(batch).flops(1, plan.cut))
    return MemoryClaim(name, width, units, batch, divisor, whole, whole_predicted, budget, plan, device, plan_ms, flops_pct)


def zoo_memory_claims(models: list[str], meter: HeapMeter, *, width: float = 1.0, batch: int = 32,
                      divisor: float = 100.0) -> list[MemoryClaim]:
    """:func:`measure_memory_claim` for zoo models at their default input shape and ``width``."""
    return [measure_memory_claim(name, build_model(name, width=width), default_input_shape(name), meter, width=width,
                                 batch=batch, divisor=divisor) for name in models]
