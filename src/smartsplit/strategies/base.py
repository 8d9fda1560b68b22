"""The one interface the server loop is built around: a strategy decides who trains and where each cuts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence, TypeVar

import numpy as np

from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.fleet import Device
from smartsplit.messages import Observation
from smartsplit.records import DeviceReport
from smartsplit.strategies.options import EngineOptions


T = TypeVar("T")


class PerCut(Sequence[T]):
    """A figure for each cut 1..L (index ``cut - 1``), each computed the first time it is read; it behaves as a
    read-only tuple. A candidate's predictions come this way (read from the engine's fleet forecast, each cut
    predicted when first read), so a strategy that looks at one cut pays for that cut only."""

    __slots__ = ("_figure", "_values")

    def __init__(self, num_units: int, figure: Callable[[int], T]) -> None:
        self._figure = figure
        self._values: list = [None] * num_units

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"cut {index + 1} is outside 1..{n}")
        return self._at(index % n)

    def _at(self, index: int) -> T:
        """The figure at 0-based ``index`` (subclasses may read it from elsewhere)."""
        value = self._values[index]
        if value is None:
            value = self._values[index] = self._figure(index + 1)
        return value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    @classmethod
    def gather(cls, figures: Sequence["PerCut"]) -> np.ndarray:
        """Many candidates' figures as one array, [candidate, cut - 1] (a subclass may gather them faster)."""
        return np.array([tuple(f) for f in figures])


def per_cut_array(figures: Sequence[Sequence]) -> np.ndarray:
    """Many candidates' per-cut figures as one array, [candidate, cut - 1]: the engine's forecasts hand theirs
    over at once; plain sequences are read one by one."""
    kinds = {type(f) for f in figures}
    if len(kinds) == 1 and issubclass(kind := kinds.pop(), PerCut):
        return kind.gather(figures)
    return np.array([tuple(f) for f in figures])


def feasibility(candidates: Sequence["Candidate"]) -> np.ndarray:
    """Which cuts fit each candidate's budget, [candidate, cut - 1]: ``Candidate.fits`` for all at once."""
    if not candidates:
        return np.zeros((0, 0), dtype=bool)
    peaks = per_cut_array([c.peaks for c in candidates])
    return peaks <= np.array([c.budget for c in candidates], dtype=peaks.dtype)[:, None]

    def __repr__(self) -> str:
        return repr(tuple(self))


@dataclass(frozen=True)
class Candidate:
    """A device that could train this round, with what the memory model and the clock predict for it.

    The per-cut figures are sequences indexed by ``cut - 1`` (tuples, or ``PerCut`` where the engine predicts
    them as they are read)."""

    device: Device
    budget: int  # bytes the device may use this round
    peaks: Sequence[int]  # predicted device peak for cuts 1..L
    step_times: Sequence[float]  # simulated seconds of one local step for cuts 1..L, without queueing
    round_times: Sequence[float] = ()  # simulated seconds of the device's whole round per cut (model transfers too)
    edge_times: Sequence[float] = ()  # seconds of edge compute the device's round needs per cut
    samples: int = 0  # training examples the device holds
    label_counts: tuple[int, ...] = ()  # of which, per class
    edge: int = 0  # the edge server the device is attached to

    def fits(self, cut: int) -> bool:
        return self.peaks[cut - 1] <= self.budget

    @cached_property
    def feasible_cuts(self) -> tuple[int, ...]:
        return tuple(c for c in range(1, len(self.peaks) + 1) if self.fits(c))


@dataclass(frozen=True)
class Assignment:
    device_id: int
    cut: int


@dataclass(frozen=True)
class RoundPlan:
    assignments: tuple[Assignment, ...]
    excluded: int  # devices that could not take part at all under this strategy's rules
    notes: dict = field(default_factory=dict)  # the inputs of the decision, logged to decisions.jsonl


def check_plan(plan: object, candidates: Sequence[Candidate], num_units: int, strategy: str) -> RoundPlan:
    """A strategy's plan, refused with a sentence naming the strategy, the field and the value unless it assigns
    distinct candidates of this round cuts within the model."""
    where = f"strategy {strategy!r}: configure_round"
    if not isinstance(plan, RoundPlan):
        raise SmartSplitError(f"{where} returned {type(plan).__name__}, not a RoundPlan")
    if not isinstance(plan.assignments, (tuple, list)) or not all(isinstance(a, Assignment) for a in plan.assignments):
        raise SmartSplitError(f"{where}: RoundPlan.assignments must be a tuple of Assignment, got {plan.assignments!r:.80}")
    if not isinstance(plan.notes, dict):
        raise SmartSplitError(f"{where}: RoundPlan.notes must be a dict (logged to decisions.jsonl), got "
                              f"{type(plan.notes).__name__}")
    if isinstance(plan.excluded, bool) or not isinstance(plan.excluded, int) or plan.excluded < 0:
        raise SmartSplitError(f"{where}: RoundPlan.excluded must be a count of devices, got {plan.excluded!r:.40}")
    offered = {c.device.id for c in candidates}
    seen: set[int] = set()
    for a in plan.assignments:
        if a.device_id not in offered:
            raise SmartSplitError(f"{where} assigned device {a.device_id!r:.20}, which is not among this round's "
                                  f"{len(offered)} candidates")
        if a.device_id in seen:
            raise SmartSplitError(f"{where} assigned device {a.device_id} twice")
        if isinstance(a.cut, bool) or not isinstance(a.cut, int) or not 1 <= a.cut <= num_units:
            raise SmartSplitError(f"{where} gave device {a.device_id} cut {a.cut!r:.20}; cuts are 1..{num_units}")
        seen.add(a.device_id)
    return plan


@dataclass(frozen=True)
class PlanRules:
    """How a strategy's devices may plan their steps (what the on-device manager is allowed to do)."""

    checkpointing: bool = False  # micro-batches and recomputation to fit the budget (else the plain step only)
    replan: bool = False  # re-plan whenever the budget changes mid-round (else keep the first plan)
    move_cut: bool = False  # when nothing fits at its cut, hand units to the edge instead of pausing


class StepObserver(ABC):
    """What a strategy wants to see of every split step, taken by the role that holds each unit (the device its
    units, the edge the rest) right after the step, while no other step has touched them. It returns plain data
    (numbers, arrays, lists), which is what travels to the central server with the round's results."""

    @abstractmethod
    def observe(self, unit: int, module: nn.Module) -> object:
        """Look at 1-based ``unit`` (its weights and fresh ``.grad``) after a step."""


class Strategy(ABC):
    """Chooses each round's participants and cuts; may learn from the rounds it has seen.

    Policy only: ``configure_round`` decides, ``round_finished`` learns. How the engine runs a strategy's rounds
    (one shared server-side copy or one per device, devices interleaved or one after another) is its
    ``execution``; how devices may plan is its ``rules``.
    """

    name: str = "strategy"
    rules: PlanRules = PlanRules()
    execution: EngineOptions = EngineOptions()

    @abstractmethod
    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        """Pick up to ``k`` of ``candidates`` and a cut for each."""

    def step_observer(self) -> StepObserver | None:
        """An observer for every unit of every split step (None: the strategy needs none)."""
        return None

    def round_finished(self, rnd: int, reports: Sequence[DeviceReport], observations: dict[int, list[Observation]] | None = None) -> None:
        """Called with the reports of the round that just ended and, with a ``step_observer``, what it returned
        for each device: ``observations[device_id]``, in step order, each ``(step, unit, value)``."""

    def state_dict(self) -> dict:
        """What the strategy learned so far, as plain data (numbers, strings, lists, dicts), saved with a run so
        that a resumed run continues exactly. A strategy that learns nothing keeps the default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (the strategy is built afresh from the config first)."""
