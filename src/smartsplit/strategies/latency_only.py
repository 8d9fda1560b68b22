"""Latency-only baseline: random devices, each at the cut that minimises its predicted round time.

Blind to memory (the cut may not fit the device's budget: the engine's guard then records the out-of-memory)
and to data (selection is uniform over all devices).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.strategies.base import Assignment, Candidate, RoundPlan, Strategy
from smartsplit.strategies.selection import predicted_times, sample_eligible


def fastest_cut(c: Candidate) -> int:
    """The cut 1..L with the least predicted round time (ties: the deeper cut, less edge work)."""
    rounds, _ = predicted_times(c)
    return min(range(1, len(rounds) + 1), key=lambda x: (rounds[x - 1], -x))


class LatencyOnly(Strategy):
    name = "latency-only"

    def __init__(self, num_units: int | None = None) -> None:
        self.num_units = num_units

    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        chosen = sample_eligible(candidates, k, rng)  # indexing ``Candidates`` makes only the chosen devices
        cuts = {c.device.id: fastest_cut(c) for c in chosen}
        return RoundPlan(
            assignments=tuple(Assignment(c.device.id, cuts[c.device.id]) for c in chosen),
            excluded=0,
            notes={"cuts_over_budget": sum(not c.fits(cuts[c.device.id]) for c in chosen)},
        )
