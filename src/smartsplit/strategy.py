"""The one interface the server loop is built around: a strategy decides who trains and where each cuts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from smartsplit.fleet import Device


@dataclass(frozen=True)
class Candidate:
    """A device that could train this round, with what the memory model and the clock predict for it."""

    device: Device
    budget: int  # bytes the device may use this round
    peaks: tuple[int, ...]  # predicted device peak for cuts 1..L
    step_times: tuple[float, ...]  # simulated seconds of one local step for cuts 1..L, without queueing
    round_times: tuple[float, ...] = ()  # simulated seconds of the device's whole round per cut (model transfers too)
    edge_times: tuple[float, ...] = ()  # seconds of edge compute the device's round needs per cut
    samples: int = 0  # training examples the device holds
    label_counts: tuple[int, ...] = ()  # of which, per class
    edge: int = 0  # the edge server the device is attached to

    def fits(self, cut: int) -> bool:
        return self.peaks[cut - 1] <= self.budget

    @property
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


class Strategy(ABC):
    """Chooses each round's participants and cuts; may learn from the rounds it has seen."""

    name: str = "strategy"
    checkpointing: bool = False  # devices plan micro-batches and recomputation (the on-device manager)
    replan: bool = False  # devices re-plan whenever their budget changes mid-round
    move_cut: bool = False  # a squeezed device hands units to the edge mid-round instead of pausing
    edge_copies: str = "shared"  # one server-side copy per edge server, or "per-device"
    edge_order: str = "interleaved"  # devices' steps reach the edge in simulated arrival order, or "sequential"
    wants_updates: bool = False  # round_finished receives per-device gradient sketches per unit

    @abstractmethod
    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        """Pick up to ``k`` of ``candidates`` and a cut for each."""

    def round_finished(self, rnd: int, reports: Sequence[dict], updates: dict | None = None) -> None:
        """Called with the per-device reports of the round that just ended (and, if ``wants_updates``, each
        device's summed gradient sketch per unit: ``updates[device_id][unit]``)."""

    def state_dict(self) -> dict:
        """What the strategy learned so far, as plain data (numbers, strings, lists, dicts), saved with a run so
        that a resumed run continues exactly. A strategy that learns nothing keeps the default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (the strategy is built afresh from the config first)."""


def sample_eligible(eligible: Sequence[Candidate], k: int, rng: np.random.Generator) -> list[Candidate]:
    """``k`` candidates chosen uniformly without replacement, in a seeded, order-stable way."""
    if len(eligible) <= k:
        return list(eligible)
    chosen = rng.choice(len(eligible), size=k, replace=False)
    return [eligible[i] for i in sorted(chosen)]
