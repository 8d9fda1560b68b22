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

    def __repr__(self) -> str:
        return repr(tuple(self))

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
    return Candidates.of(candidates).feasibility()


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


class CandidateSource(ABC):
    """Where a ``Candidates``' per-cut figures and its ``Candidate`` objects come from (rows are positions in it)."""

    @abstractmethod
    def per_cut(self, name: str, rows: np.ndarray, cuts: Sequence[int]) -> np.ndarray:
        """Figure ``name`` of ``rows`` at ``cuts`` (1-based), [row, position in cuts]. ``round_times`` defaults to
        the step times and ``edge_times`` to zeros where a candidate has none (``predicted_times``)."""

    @abstractmethod
    def candidate(self, row: int) -> Candidate:
        """Row ``row`` as a ``Candidate``."""


class Candidates(Sequence[Candidate]):
    """A round's candidates held as columns: one array per attribute, a row per device. Indexing gives a
    ``Candidate`` (made when read), so a strategy may treat it as a list; the built-in strategies read the
    columns, so a fleet of 100,000 devices is never 100,000 objects. The figures are the round's: read them
    during the round they were offered in."""

    def __init__(self, source: CandidateSource, ids: np.ndarray, budgets: np.ndarray, samples: np.ndarray,
                 edges: np.ndarray, label_counts: np.ndarray, num_units: int, rows: np.ndarray | None = None) -> None:
        self._source, self.num_units = source, num_units
        self.ids, self.budgets, self.samples, self.edges = ids, budgets, samples, edges
        self.label_counts = label_counts  # [row, class]
        self._rows = np.arange(len(ids)) if rows is None else rows

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> "Candidates":
        """``candidates`` as columns (itself if it already is)."""
        if isinstance(candidates, Candidates):
            return candidates
        from smartsplit.strategies.selection import label_matrix

        listed = list(candidates)
        column = lambda read, dtype: np.array([read(c) for c in listed], dtype=dtype)  # noqa: E731
        return cls(_Listed(listed), column(lambda c: c.device.id, np.int64), column(lambda c: c.budget, np.int64),
                   column(lambda c: c.samples, np.int64), column(lambda c: c.edge, np.int64),
                   label_matrix([c.label_counts for c in listed]), max((len(c.peaks) for c in listed), default=0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._source.candidate(int(self._rows[index]))

    def take(self, rows: np.ndarray) -> "Candidates":
        """The candidates at ``rows`` (positions in this one), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return Candidates(self._source, self.ids[rows], self.budgets[rows], self.samples[rows], self.edges[rows],
                          self.label_counts[rows], self.num_units, self._rows[rows])

    def figure(self, name: str, cuts: Sequence[int] | None = None) -> np.ndarray:
        """Figure ``name`` (peaks, step_times, round_times, edge_times) of every candidate, [row, cut - 1], or at
        ``cuts`` only (predicted only there)."""
        cuts = range(1, self.num_units + 1) if cuts is None else cuts
        if not len(self):
            return np.zeros((0, len(cuts)))
        return self._source.per_cut(name, self._rows, list(cuts))

    def fits(self, cut: int) -> np.ndarray:
        """Whether ``cut``'s plan fits each candidate's budget (``Candidate.fits`` for all)."""
        return self.figure("peaks", [cut])[:, 0] <= self.budgets

    def feasibility(self) -> np.ndarray:
        """Which cuts fit each candidate's budget, [row, cut - 1]."""
        if not len(self):
            return np.zeros((0, self.num_units), dtype=bool)
        return self.figure("peaks") <= self.budgets[:, None]

    def rows_of(self, device_ids: Sequence[int]) -> np.ndarray:
        """The rows of ``device_ids`` (each must be a candidate's)."""
        order = np.argsort(self.ids, kind="stable")
        return order[np.searchsorted(self.ids, device_ids, sorter=order)]


class _Listed(CandidateSource):
    """Candidates given as objects (a strategy called with a list)."""

    def __init__(self, listed: list[Candidate]) -> None:
        self.listed = listed

    def per_cut(self, name: str, rows: np.ndarray, cuts: Sequence[int]) -> np.ndarray:
        from smartsplit.strategies.selection import predicted_times

        read = {"round_times": lambda c: predicted_times(c)[0], "edge_times": lambda c: predicted_times(c)[1]}.get(
            name, lambda c: getattr(c, name))
        return per_cut_array([read(self.listed[r]) for r in rows])[:, np.asarray(cuts) - 1]

    def candidate(self, row: int) -> Candidate:
        return self.listed[row]


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
    offered = set(Candidates.of(candidates).ids.tolist())
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
