"""The central manager: who trains this round and where each one cuts (DESIGN 4)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.strategy import Assignment, Candidate, RoundPlan, Strategy, sample_eligible


class SmartSplit(Strategy):
    """Every device with a cut that fits its budget can take part; each gets its fastest feasible cut."""

    name = "smartsplit"
    checkpointing = replan = move_cut = True

    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        eligible = [c for c in candidates if c.feasible_cuts]
        chosen = sample_eligible(eligible, k, rng)
        assignments = tuple(
            Assignment(c.device.id, min(c.feasible_cuts, key=lambda cut: (c.step_times[cut - 1], -cut))) for c in chosen
        )
        return RoundPlan(assignments=assignments, excluded=len(candidates) - len(eligible))
