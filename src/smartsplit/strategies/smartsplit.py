"""The central manager: who trains this round and where each one cuts.

Each round:
1. feasible cuts are those whose best plan fits the budget forecast (``Candidate.feasible_cuts``); a device
   with none cannot take part;
2. a cut's round time is the engine's prediction with the device-side part (its compute and its link)
   scaled by the device's measured speed factor (``DeviceHistory``);
3. utility = statistical utility (samples x RMS of its last training loss; an optimistic guess for devices
   never seen) x (1 + label-coverage bonus for the round) x system penalty; with a hard deadline, devices
   that cannot meet it are dropped instead of penalised. The ``K`` best are picked greedily, because the
   coverage bonus depends on who is already in;
4. cuts are assigned jointly: each device starts at its fastest feasible cut; while an edge server's load
   exceeds the slowest device's round time, the device on that edge whose next deeper feasible cut sheds
   the most edge work (without becoming the round's new bottleneck) moves there;
5. the MEC manager may then nudge each cut one unit, where that does not lengthen the round.

Every decision's inputs go to ``RoundPlan.notes`` (decisions.jsonl). The helpers here (statistical utility,
system penalty, coverage bonus, speed history) live in ``strategies.selection``, shared with the baselines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from smartsplit.records import DeviceReport
from smartsplit.strategies.base import (
    Assignment, Candidate, Candidates, Observation, PlanRules, RoundPlan, StepObserver, Strategy,
)
from smartsplit.strategies.selection import (
    DeviceHistory, coverage_bonus, coverage_bonuses, present_classes, sample_eligible,
    statistical_utility, system_penalty,
)

if TYPE_CHECKING:
    from smartsplit.strategies.mec import MecManager


# --------------------------------------------------------------------------- the central manager


class SmartSplit(Strategy):
    """SmartSplit's central manager, each part switchable off for ablations.

    ``selection=False``: random ``K`` among memory-feasible devices (no utility, coverage or deadline);
    ``cut_finetuning=False`` or no ``mec``: cuts stay where the joint assignment put them;
    ``checkpointing=False``: devices run plain plans (no on-device manager, no re-planning, no mid-round cut moves).
    ``deadline_s``: drop devices whose fastest feasible round would exceed it; without it, rounds longer than
    the median fastest round time of the eligible devices get the soft penalty ``(median / t) ** alpha``.
    ``exploration``: an unseen device's loss is guessed as ``exploration`` x the highest loss of the latest
    round (1.0 before any round), so it competes with the most promising devices seen; 0 turns it off.
    ``coverage``: weight of the label-coverage bonus.
    """

    def __init__(
        self,
        num_units: int | None = None,  # unused (cuts come with the candidates); kept for a uniform constructor
        *,
        selection: bool = True,
        cut_finetuning: bool = True,
        checkpointing: bool = True,
        deadline_s: float | None = None,
        mec: MecManager | None = None,
        exploration: float = 1.0,
        coverage: float = 0.5,
        alpha: float = 2.0,
        speed_smoothing: float = 0.5,
        name: str | None = None,
    ) -> None:
        self.selection, self.cut_finetuning, self.deadline_s, self.mec = selection, cut_finetuning, deadline_s, mec
        self.rules = PlanRules(checkpointing=checkpointing, replan=checkpointing, move_cut=checkpointing)
        self.exploration, self.coverage, self.alpha = exploration, coverage, alpha
        self.history = DeviceHistory(speed_smoothing)
        self.importance: dict[int, float] = {}  # the MEC manager's latest unit scores
        switches = (("selection", selection), ("finetuning", cut_finetuning), ("ckpt", checkpointing))
        self.name = name or "-".join(["smartsplit", *(f"no-{s}" for s, on in switches if not on)])

    # ---- selection

    def _scores(self, pool: Candidates, fastest: np.ndarray, preferred: float) -> dict[str, np.ndarray]:
        """Per row of ``pool``: statistical utility and system penalty (the parts that do not depend on who else
        is in), and whether the device was seen; columns, computed one device at a time (the same floats as a
        single device's)."""
        guess = self.exploration * (self.history.latest_loss if self.history.latest_loss is not None else 1.0)
        losses = [self.history.loss_rms.get(i) for i in pool.ids.tolist()]
        return {
            "seen": np.array([loss is not None for loss in losses], dtype=bool),
            "statistical": np.array([statistical_utility(n, guess if loss is None else loss)
                                     for n, loss in zip(pool.samples.tolist(), losses)], dtype=float),
            "penalty": np.ones(len(pool)) if self.deadline_s is not None else np.array(
                [system_penalty(t, preferred, self.alpha) for t in fastest.tolist()], dtype=float),
        }

    def _select(self, counts: np.ndarray, statistical: np.ndarray, penalty: np.ndarray, k: int,
                rng: np.random.Generator) -> list[tuple[int, float]]:
        """Greedy over the rows of a pool (its ``label_matrix``, statistical utilities and penalties): repeatedly
        take the highest utility, the coverage bonus recomputed against those taken; ties go to the earlier in a
        seeded order. Every device's utility is recomputed at each pick, in arrays: the same arithmetic as
        ``_select_plainly`` (the yardstick the tests hold it to), so the same choice. Returns (row, coverage bonus)
        in the order taken."""
        order = rng.permutation(len(counts))
        counts, statistical, penalty = counts[order], statistical[order], penalty[order]
        covered = np.zeros(counts.shape[1], dtype=bool)
        taken = np.zeros(len(order), dtype=bool)
        chosen: list[tuple[int, float]] = []
        while len(chosen) < min(k, len(order)):
            bonus = coverage_bonuses(counts, self.coverage, covered)
            utility = statistical * (1.0 + bonus) * penalty
            best = int(np.flatnonzero(~taken)[np.argmax(utility[~taken])])  # the first of equals, in seeded order
            chosen.append((int(order[best]), float(bonus[best])))
            taken[best] = True
            covered[list(present_classes(counts[best].tolist()))] = True
        return chosen

    def _select_plainly(self, order: list[Candidate], k: int, scores: dict[int, dict]) -> list[Candidate]:
        """The greedy selection one device at a time: the yardstick ``_select`` is tested against."""
        remaining, chosen, covered = list(order), [], set()
        while remaining and len(chosen) < k:
            scored = [(bonus := coverage_bonus(c.label_counts, covered, self.coverage),
                       self._utility(scores[c.device.id], bonus)) for c in remaining]
            best = max(range(len(remaining)), key=lambda i: scored[i][1])
            c = remaining.pop(best)
            scores[c.device.id].update(coverage_bonus=scored[best][0], rank=len(chosen))
            chosen.append(c)
            covered |= present_classes(c.label_counts)
        return chosen

    @staticmethod
    def _utility(score: dict, bonus: float) -> float:
        return score["statistical"] * (1.0 + bonus) * score["penalty"]

    # ---- cuts

    def _assign(self, chosen: list[Candidate], times: dict[int, tuple]) -> tuple[dict[int, int], int]:
        """Fastest feasible cut each, then deeper cuts while a shared edge is the bottleneck. Returns cuts and moves."""
        feasible = {c.device.id: c.feasible_cuts for c in chosen}
        cuts = {i: min(f, key=lambda x: (times[i][0][x - 1], -x)) for i, f in feasible.items()}
        cap = self.deadline_s if self.deadline_s is not None else float("inf")
        moves = 0
        while chosen:
            slowest = max(times[i][0][cut - 1] for i, cut in cuts.items())
            load = edge_loads(chosen, cuts, times)
            bound = max(slowest, *load.values())
            best = None  # (edge work shed, -device id, candidate, new cut)
            for edge in sorted((e for e in load if load[e] > slowest), key=lambda e: (-load[e], e)):
                for c in chosen:
                    i, cut = c.device.id, cuts[c.device.id]
                    deeper = [x for x in feasible[i] if x > cut]
                    if c.edge != edge or not deeper:
                        continue
                    rounds, edge_s = times[i]
                    shed = edge_s[cut - 1] - edge_s[deeper[0] - 1]
                    fast_enough = rounds[deeper[0] - 1] <= min(bound, cap)  # not the round's new bottleneck
                    if shed > 0 and fast_enough and (best is None or (shed, -i) > best[:2]):
                        best = (shed, -i, c, deeper[0])
                if best is not None:
                    break  # relieve the most loaded edge that can be relieved
            if best is None:
                return cuts, moves
            cuts[best[2].device.id] = best[3]
            moves += 1
        return cuts, moves

    # ---- the round

    def configure_round(self, rnd: int, candidates: Sequence[Candidate], k: int, rng: np.random.Generator) -> RoundPlan:
        """Select (utility, within the deadline), assign cuts jointly, let the MEC manager fine-tune them."""
        candidates = Candidates.of(candidates)  # read as columns: a row per device, no object per device
        fits = candidates.feasibility()  # every candidate at every cut
        rows = np.flatnonzero(fits.any(axis=1))
        feasible = candidates.take(rows)
        fastest = self.history.fastest(feasible, fits[rows])
        in_time = np.ones(len(feasible), dtype=bool) if self.deadline_s is None else fastest <= self.deadline_s
        median = float(np.median(fastest)) if len(fastest) else 0.0
        preferred = self.deadline_s if self.deadline_s is not None else median
        columns = self._scores(feasible, fastest, preferred)
        scores: dict[int, dict] = {}
        if self.selection:
            pool = np.flatnonzero(in_time)
            picked = self._select(feasible.label_counts[pool], columns["statistical"][pool], columns["penalty"][pool],
                                  k, rng)
            picks = [(int(pool[row]), {"coverage_bonus": bonus, "rank": rank}) for rank, (row, bonus) in enumerate(picked)]
        else:
            picks = [(int(row), {}) for row in sample_eligible(range(len(feasible)), k, rng)]
        for row, extra in picks:
            scores[int(feasible.ids[row])] = {"seen": bool(columns["seen"][row]),
                                              "statistical": float(columns["statistical"][row]),
                                              "penalty": float(columns["penalty"][row]), **extra}
        chosen = sorted((feasible[row] for row, _ in picks), key=lambda c: c.device.id)
        times = {c.device.id: self.history.times(c) for c in chosen}

        cuts, rebalance_moves = self._assign(chosen, times)
        moved = self._fine_tune(chosen, cuts, times) if self.cut_finetuning and self.mec is not None else {
            "deeper": 0, "shallower": 0}
        for c in chosen:
            self.history.plan(c, cuts[c.device.id])
        notes = {
            "selected": self._selected_notes(chosen, cuts, times, scores),
            "preferred_round_s": preferred,
            "dropped_by_deadline": int(len(feasible) - in_time.sum()),
            "edge_load_s": {str(e): v for e, v in sorted(edge_loads(chosen, cuts, times).items())},
            "predicted_latency_s": predicted_latency(chosen, cuts, times),
            "rebalance_moves": rebalance_moves,
            "mec_moves": moved["deeper"] + moved["shallower"],
            "mec_moves_by_direction": moved,
            "unit_importance": {str(u): float(v) for u, v in sorted(self.importance.items())},
        }
        return RoundPlan(
            assignments=tuple(Assignment(c.device.id, cuts[c.device.id]) for c in chosen),
            excluded=len(candidates) - len(feasible),
            notes=notes,
        )

    def _fine_tune(self, chosen: list[Candidate], cuts: dict[int, int], times: dict) -> dict[str, int]:
        """The MEC manager's nudges to ``cuts`` (in place); how many went each way.

        They may not make the round longer: the round's predicted latency (its slowest device or its busiest
        edge) may not exceed the joint assignment's, nor a device miss the deadline. A deeper move must also pay:
        it takes a unit off the shared edge copy, which learns from every device's activations, to train it per
        device and average it, so it is made only where the device's edge is (nearly) the round's bottleneck and
        shedding its work there is worth something."""
        moved = {"deeper": 0, "shallower": 0}
        bound = predicted_latency(chosen, cuts, times)
        for c in chosen:
            i = c.device.id

            def keeps_the_round(new_cut: int, i: int = i, edge: int = c.edge, feasible: tuple = c.feasible_cuts) -> bool:
                if new_cut not in feasible:
                    return False
                trial = {**cuts, i: new_cut}
                in_time = self.deadline_s is None or times[i][0][new_cut - 1] <= self.deadline_s
                if not (in_time and predicted_latency(chosen, trial, times) <= bound):
                    return False
                return new_cut < cuts[i] or edge_loads(chosen, cuts, times)[edge] >= EDGE_BUSY * bound

            new = self.mec.adjust(i, cuts[i], c.feasible_cuts, accept=keeps_the_round)
            if new != cuts[i] and new in c.feasible_cuts:
                moved["deeper" if new > cuts[i] else "shallower"] += 1
                cuts[i] = new
        return moved

    def _selected_notes(self, chosen: list[Candidate], cuts: dict[int, int], times: dict, scores: dict) -> list[dict]:
        """Each chosen device's scores, cut and predicted round time, for the round's decision record."""
        selected = []
        for c in chosen:
            s, i = scores[c.device.id], c.device.id
            bonus = s.get("coverage_bonus")
            selected.append({
                "device": i,
                "rank": s.get("rank"),
                "seen": s["seen"],
                "statistical": s["statistical"],
                "coverage_bonus": bonus,
                "penalty": s["penalty"],
                "utility": self._utility(s, bonus) if bonus is not None else None,
                "speed_factor": self.history.speed.get(i, 1.0),
                "cut": cuts[i],
                "predicted_round_s": float(times[i][0][cuts[i] - 1]),
            })
        return selected

    def step_observer(self) -> StepObserver | None:
        return self.mec.observer() if self.cut_finetuning and self.mec is not None else None

    def round_finished(self, rnd: int, reports: Sequence[DeviceReport], observations: dict[int, list[Observation]] | None = None) -> None:
        from smartsplit.strategies.mec import step_sketches

        self.history.observe(reports)
        if self.mec is not None and observations:
            self.importance = dict(self.mec.update({device: step_sketches(seen) for device, seen in observations.items()}))

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict(), "importance": dict(self.importance),
                "mec": self.mec.state_dict() if self.mec is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state["history"])
        self.importance = {int(k): float(v) for k, v in state["importance"].items()}
        if self.mec is not None and state["mec"] is not None:
            self.mec.load_state_dict(state["mec"])


EDGE_BUSY = 0.8  # an edge at this share of the round's predicted latency or more is (nearly) its bottleneck


def predicted_latency(chosen: Sequence[Candidate], cuts: dict[int, int], times: dict[int, tuple]) -> float:
    """The round's predicted latency at the given cuts: its slowest device's round or its busiest edge's work."""
    slowest = max((float(times[c.device.id][0][cuts[c.device.id] - 1]) for c in chosen), default=0.0)
    return max(slowest, *edge_loads(chosen, cuts, times).values(), 0.0)


def edge_loads(chosen: Sequence[Candidate], cuts: dict[int, int], times: dict[int, tuple]) -> dict[int, float]:
    """Seconds of edge compute each edge server owes this round at the given cuts."""
    load: dict[int, float] = {}
    for c in chosen:
        load[c.edge] = load.get(c.edge, 0.0) + float(times[c.device.id][1][cuts[c.device.id] - 1])
    return load
