"""Oort-style guided participant selection (Lai et al., OSDI 2021) with whole-model training.

Exploitation: devices seen before, ranked by statistical utility (samples x RMS loss) x system penalty
``(T / t) ** alpha`` for a round time ``t`` above the preferred duration ``T`` (here the median whole-model round
time of the eligible devices); the ``K`` are sampled, in proportion to utility, among those within ``cutoff``
of the K-th best (Oort's clipped sampling). Exploration: a fraction ``epsilon`` of the slots (decaying each
round to ``min_epsilon``) goes to devices never seen, at random; the defaults (0.9, x0.98, floor 0.3, alpha 2,
cutoff 0.95) follow Oort's reference implementation as we recall it.
Like FedAvg, every device trains the whole model (cut = L); one whose whole-model peak does not fit cannot take
part. Speeds are learned from the reports as in the central manager.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartsplit.records import DeviceReport
from smartsplit.strategies.base import Assignment, Candidate, Candidates, RoundPlan, Strategy
from smartsplit.strategies.selection import DeviceHistory, sample_eligible, statistical_utility, system_penalty


class Oort(Strategy):
    name = "oort"

    def __init__(
        self,
        num_units: int,
        *,
        epsilon: float = 0.9,
        decay: float = 0.98,
        min_epsilon: float = 0.3,
        alpha: float = 2.0,
        cutoff: float = 0.95,
    ) -> None:
        self.num_units = num_units
        self.epsilon, self.decay, self.min_epsilon, self.alpha, self.cutoff = epsilon, decay, min_epsilon, alpha, cutoff
        self.history = DeviceHistory()

    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        L = self.num_units
        candidates = Candidates.of(candidates)
        eligible = candidates.take(np.flatnonzero(candidates.fits(L)))
        rounds, edge = (eligible.figure(name, [L])[:, 0].astype(float) for name in ("round_times", "edge_times"))
        speed = np.array([self.history.speed.get(i, 1.0) for i in eligible.ids.tolist()])
        whole = speed * (rounds - edge) + edge  # ``DeviceHistory.times`` at cut L, for every eligible device
        preferred = float(np.median(whole)) if len(whole) else 0.0
        known = np.array([i in self.history.loss_rms for i in eligible.ids.tolist()], dtype=bool)
        seen_rows = np.flatnonzero(known)
        seen = [eligible[row] for row in seen_rows.tolist()]  # devices that trained before: a few
        unseen = eligible.take(np.flatnonzero(~known))
        times = dict(zip(eligible.ids[seen_rows].tolist(), whole[seen_rows].tolist()))
        epsilon = max(self.min_epsilon, self.epsilon * self.decay**rnd)
        n_explore = min(len(unseen), round(epsilon * k))
        n_exploit = min(len(seen), k - n_explore)
        n_explore = min(len(unseen), k - n_exploit)

        utility = {
            c.device.id: statistical_utility(c.samples, self.history.loss_rms[c.device.id])
            * system_penalty(times[c.device.id], preferred, self.alpha)
            for c in seen
        }
        chosen = sorted(self._exploit(seen, n_exploit, utility, rng) + sample_eligible(unseen, n_explore, rng),
                        key=lambda c: c.device.id)
        for c in chosen:
            self.history.plan(c, L)
        notes = {
            "epsilon": epsilon,
            "explored": n_explore,
            "exploited": n_exploit,
            "preferred_round_s": preferred,
            "selected": [
                {"device": c.device.id, "seen": c.device.id in utility, "utility": utility.get(c.device.id),
                 "predicted_round_s": float(self.history.times(c)[0][L - 1])}
                for c in chosen
            ],
        }
        return RoundPlan(tuple(Assignment(c.device.id, L) for c in chosen), len(candidates) - len(eligible), notes)

    def _exploit(
        self, seen: list[Candidate], n: int, utility: dict[int, float], rng: np.random.Generator
    ) -> list[Candidate]:
        """``n`` devices sampled by utility among those within ``cutoff`` of the n-th best."""
        if n <= 0:
            return []
        ranked = sorted(seen, key=lambda c: (-utility[c.device.id], c.device.id))
        floor = self.cutoff * utility[ranked[n - 1].device.id]
        pool = [c for c in ranked if utility[c.device.id] >= floor]
        weights = np.maximum([utility[c.device.id] for c in pool], 1e-12)
        picked = rng.choice(len(pool), size=n, replace=False, p=weights / weights.sum())
        return [pool[i] for i in sorted(picked)]

    def round_finished(self, rnd: int, reports: Sequence[DeviceReport], observations: dict | None = None) -> None:
        self.history.observe(reports)

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state["history"])
