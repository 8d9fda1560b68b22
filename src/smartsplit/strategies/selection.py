"""Selection helpers strategies share."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.strategies.base import Candidate


def sample_eligible(eligible: Sequence[Candidate], k: int, rng: np.random.Generator) -> list[Candidate]:
    """``k`` candidates chosen uniformly without replacement, in a seeded, order-stable way."""
    if len(eligible) <= k:
        return list(eligible)
    chosen = rng.choice(len(eligible), size=k, replace=False)
    return [eligible[i] for i in sorted(chosen)]
