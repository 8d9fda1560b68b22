"""Baselines with one cut for every device: FedAvg (cut = L) and SplitFed (a fixed middle cut)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.strategy import Assignment, Candidate, RoundPlan, Strategy, sample_eligible


class FixedCut(Strategy):
    """Every participant cuts at ``cut``; a device whose predicted peak there exceeds its budget cannot take part."""

    def __init__(self, name: str, cut: int, checkpointing: bool = False) -> None:
        self.name = name
        self.cut = cut
        self.checkpointing = self.replan = checkpointing

    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        eligible = [c for c in candidates if c.fits(self.cut)]
        chosen = sample_eligible(eligible, k, rng)
        return RoundPlan(
            assignments=tuple(Assignment(c.device.id, self.cut) for c in chosen),
            excluded=len(candidates) - len(eligible),
        )


def fedavg(num_units: int) -> FixedCut:
    return FixedCut("fedavg", num_units)


def fedavg_ckpt(num_units: int) -> FixedCut:
    """FedAvg whose devices run the on-device manager's optimal plan (whole model on device)."""
    return FixedCut("fedavg-ckpt", num_units, checkpointing=True)


def splitfed(num_units: int, cut: int | None = None) -> FixedCut:
    return FixedCut("splitfed", cut if cut is not None else max(1, num_units // 2))
