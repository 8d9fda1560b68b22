"""Baselines with one cut for every device: FedAvg (cut = L) and SplitFed (a fixed middle cut).

SplitFed-v1 gives every device its own server-side copy (aggregated with the rest at round end);
SplitFed-v2 trains one shared server-side copy on the devices one after another.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.strategies.options import EngineOptions
from smartsplit.strategies.base import Assignment, Candidate, Candidates, PlanRules, RoundPlan, Strategy
from smartsplit.strategies.selection import sample_eligible


class FixedCut(Strategy):
    """Every participant cuts at ``cut``; a device whose predicted peak there exceeds its budget cannot take part."""

    def __init__(self, name: str, cut: int, checkpointing: bool = False, execution: EngineOptions = EngineOptions()) -> None:
        self.name = name
        self.cut = cut
        self.rules = PlanRules(checkpointing=checkpointing, replan=checkpointing)
        self.execution = execution

    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        candidates = Candidates.of(candidates)
        eligible = np.flatnonzero(candidates.fits(self.cut))
        chosen = sample_eligible(candidates.ids[eligible], k, rng)
        return RoundPlan(
            assignments=tuple(Assignment(int(i), self.cut) for i in chosen),
            excluded=len(candidates) - len(eligible),
        )


def fedavg(num_units: int) -> FixedCut:
    return FixedCut("fedavg", num_units)


def fedavg_ckpt(num_units: int) -> FixedCut:
    """FedAvg whose devices run the on-device manager's optimal plan (whole model on device)."""
    return FixedCut("fedavg-ckpt", num_units, checkpointing=True)


def splitfed(num_units: int, cut: int | None = None, version: int = 1) -> FixedCut:
    """SplitFed at ``cut`` (default: the middle unit); ``version`` 1 or 2 (see the module docstring)."""
    cut = cut if cut is not None else max(1, num_units // 2)
    if version == 1:
        return FixedCut("splitfed-v1", cut, execution=EngineOptions(edge_copies="per-device"))
    return FixedCut("splitfed-v2", cut, execution=EngineOptions(edge_order="sequential"))
