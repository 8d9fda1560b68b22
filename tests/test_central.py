"""Central manager (selection, deadline, joint cut assignment, MEC hook), Oort and latency-only baselines."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest

from smartsplit.fleet import Device
from smartsplit.strategies.smartsplit import SmartSplit, coverage_bonus, statistical_utility, system_penalty
from smartsplit.records import DeviceReport
from smartsplit.strategies import Candidate, sample_eligible
from smartsplit.strategies.latency_only import LatencyOnly
from smartsplit.strategies.selection import label_matrix
from smartsplit.strategies.oort import Oort

L = 3


def cand(
    i: int,
    *,
    budget: int = 100,
    peaks=(10, 20, 30),
    rounds=(3.0, 2.0, 1.0),
    edge_s=(0.0, 0.0, 0.0),
    samples: int = 100,
    labels=(),
    edge: int = 0,
) -> Candidate:
    return Candidate(
        device=Device(i, "test", budget, 1e9, 1e6, 1e6), budget=budget, peaks=tuple(peaks), step_times=tuple(rounds),
        round_times=tuple(rounds), edge_times=tuple(edge_s), samples=samples, label_counts=tuple(labels), edge=edge,
    )


def random_candidates(rng: np.random.Generator, n: int, units: int = 5) -> list[Candidate]:
    out = []
    for i in range(n):
        peaks = np.sort(rng.integers(1, 100, units))
        rounds = rng.uniform(1, 20, units)
        edge_s = np.sort(rng.uniform(0, 10, units))[::-1] * (np.arange(units, 0, -1) > 1)  # 0 at cut L
        labels = rng.integers(0, 50, 10) * (rng.random(10) < 0.4)
        out.append(
            cand(i, budget=int(rng.integers(0, 120)), peaks=peaks.tolist(), rounds=rounds.tolist(),
                 edge_s=edge_s.tolist(), samples=int(rng.integers(1, 500)), labels=labels.tolist(),
                 edge=int(rng.integers(0, 3)))
        )
    return out


def report(device: int, cut: int, loss_rms: float, busy_s: float = 0.0, **extra) -> DeviceReport:
    values = {"device": device, "cut": cut, "final_cut": cut, "steps": 5, "samples": 40, "loss": loss_rms,
              "loss_rms": loss_rms, "compute_s": busy_s, "comm_s": 0.0, "wait_s": 0.0, "oom_events": 0, "pauses": 0,
              **extra}
    return DeviceReport.from_json({"class": "test", **values})


def plan_of(strategy, cands, k, seed=0, rnd=0):
    return strategy.configure_round(rnd, cands, k, np.random.default_rng(seed))


class FakeMec:
    """Moves every cut one deeper (even where it does not fit) and records what it was given."""

    def __init__(self) -> None:
        self.updates: list = []

    def update(self, per_device):
        self.updates.append(per_device)
        return {1: 0.1, 2: 0.9}

    def adjust(self, device_id, cut, feasible_cuts, accept=lambda new_cut: True):
        return cut + 1 if accept(cut + 1) else cut


# --------------------------------------------------------------------------- helpers


def test_utility_helpers() -> None:
    assert statistical_utility(200, 1.0) > statistical_utility(100, 1.0) > statistical_utility(100, 0.5)
    assert system_penalty(5.0, 10.0) == 1.0 and system_penalty(20.0, 10.0) == pytest.approx(0.25)
    assert system_penalty(20.0, 10.0, alpha=1.0) == pytest.approx(0.5)
    labels = (50, 50, 0, 1)  # the single example of class 3 is not coverage
    assert coverage_bonus(labels, set(), 0.5) == pytest.approx(0.5 * 100 / 101)
    assert coverage_bonus(labels, {0}, 0.5) == pytest.approx(0.5 * 50 / 101)
    assert coverage_bonus(labels, {0, 1}, 0.5) == 0.0 and coverage_bonus((), set(), 0.5) == 0.0


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("seed", range(20))
def test_selection_and_cuts_respect_memory_for_random_candidates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cands = random_candidates(rng, 30)
    by_id = {c.device.id: c for c in cands}
    for strategy in (SmartSplit(), SmartSplit(selection=False), SmartSplit(mec=FakeMec()), SmartSplit(deadline_s=8.0)):
        plan = plan_of(strategy, cands, 8, seed)
        assert plan.excluded == sum(not c.feasible_cuts for c in cands)
        assert len(plan.assignments) == min(8, len(cands) - plan.excluded) or strategy.deadline_s is not None
        for a in plan.assignments:
            assert a.cut in by_id[a.device_id].feasible_cuts  # never over the budget forecast


def test_deadline_drops_devices_that_cannot_meet_it() -> None:
    cands = [cand(i, rounds=(3.0 + i, 2.0 + i, 1.0 + i)) for i in range(6)]  # fastest round: 1 + i s
    cands.append(cand(6, peaks=(10, 200, 300), rounds=(2.5, 1.0, 1.0)))  # fast at cut 2, but only cut 1 fits
    plan = plan_of(SmartSplit(deadline_s=2.6), cands, 10)
    assert {a.device_id for a in plan.assignments} == {0, 1, 6}
    assert plan.notes["dropped_by_deadline"] == 4 and plan.excluded == 0
    for s in plan.notes["selected"]:
        assert s["predicted_round_s"] <= 2.6
    # nor does the MEC manager's nudge push a device past it
    late = cand(7, rounds=(1.0, 5.0, 6.0))
    plan = plan_of(SmartSplit(deadline_s=2.6, mec=FakeMec()), [*cands, late], 10)
    assert {a.device_id: a.cut for a in plan.assignments}[7] == 1 and plan.notes["mec_moves"] == 0


def test_utility_prefers_high_loss_and_many_samples() -> None:
    cands = [cand(0, samples=100), cand(1, samples=100), cand(2, samples=400), cand(3, samples=100)]
    s = SmartSplit()
    s.round_finished(0, [report(0, 3, 0.5), report(1, 3, 2.0), report(2, 3, 0.6), report(3, 3, 0.1)])
    picks = [a.device_id for a in plan_of(s, cands, 2).assignments]
    assert picks == [1, 2]  # 100 x 2.0 and 400 x 0.6 beat 100 x 0.5 and 100 x 0.1
    ranks = {x["device"]: x["rank"] for x in plan_of(s, cands, 2).notes["selected"]}
    assert ranks == {2: 0, 1: 1}  # 240 before 200


def test_slow_devices_are_penalised_and_speed_is_learned() -> None:
    cands = [cand(i, rounds=(3.0, 2.0, 1.0)) for i in range(5)] + [cand(5, rounds=(30.0, 20.0, 10.0), samples=150)]
    s = SmartSplit()
    assert 5 not in [a.device_id for a in plan_of(s, cands, 2).assignments]  # 150 x (1/10)^2 vs 100 x 1
    plan_of(s, cands, 6)  # everyone plans cut 3 (1 s device-side; 10 s for device 5)
    s.round_finished(0, [report(i, 3, 1.0, busy_s=1.0) for i in range(4)] + [report(4, 3, 1.0, busy_s=4.0)])
    assert s.history.speed[4] == pytest.approx(4.0) and s.history.speed[0] == pytest.approx(1.0)
    notes = plan_of(s, cands, 6).notes["selected"]
    assert {x["device"]: x["predicted_round_s"] for x in notes}[4] == pytest.approx(4.0)
    # a round cut short by an out-of-memory says nothing about speed
    s.round_finished(1, [report(4, 3, 1.0, busy_s=0.1, oom_events=1)])
    assert s.history.speed[4] == pytest.approx(4.0)


def test_unseen_devices_are_explored() -> None:
    cands = [cand(i) for i in range(6)]
    for exploration, expect in ((1.0, {4, 5}), (0.0, {3, 4})):
        s = SmartSplit(exploration=exploration)
        s.round_finished(0, [report(i, 3, 0.2 * (i + 1)) for i in range(5)])  # device 5 never seen
        picks = {a.device_id for a in plan_of(s, cands, 2).assignments}
        assert picks == expect
    # with no history at all every device is unseen: the choice is the rng's
    assert len({plan_of(SmartSplit(), cands, 2, seed).assignments for seed in range(6)}) > 1


def test_coverage_bonus_prefers_missing_labels() -> None:
    cands = [
        cand(0, samples=100, labels=(50, 50, 0, 0)),
        cand(1, samples=110, labels=(55, 55, 0, 0)),  # more data, but the same classes as device 0
        cand(2, samples=95, labels=(0, 0, 45, 50)),  # a little less data, but the classes the others lack
    ]
    s = SmartSplit()
    s.round_finished(0, [report(i, 3, 1.0) for i in range(3)])
    assert [a.device_id for a in plan_of(s, cands, 2).assignments] == [1, 2]
    s0 = SmartSplit(coverage=0.0)
    s0.round_finished(0, [report(i, 3, 1.0) for i in range(3)])
    assert {a.device_id for a in plan_of(s0, cands, 2).assignments} == {0, 1}


@pytest.mark.parametrize("seed", range(6))
def test_the_selection_in_arrays_chooses_what_the_plain_greedy_does(seed: int) -> None:
    """Selection recomputes every device's utility at each pick in arrays; ties (few distinct samples, losses and
    penalties here) must still go to the earlier device in the seeded order, and the bonus and rank recorded
    must be the one-at-a-time greedy's."""
    rng = np.random.default_rng(seed)
    pool = [cand(i, samples=int(rng.choice([50, 100])), labels=(rng.integers(0, 4, 10) * (rng.random(10) < 0.5)).tolist())
            for i in range(60)]
    scores = {c.device.id: {"statistical": float(c.samples * rng.choice([1.0, 2.0])), "penalty": float(rng.choice([0.5, 1.0]))}
              for c in pool}
    strategy = SmartSplit(coverage=float(rng.choice([0.0, 0.5, 3.0])))
    counts = label_matrix([c.label_counts for c in pool])
    statistical, penalty = (np.array([scores[c.device.id][key] for c in pool]) for key in ("statistical", "penalty"))
    for k in (1, 7, 60, 80):
        plain = copy.deepcopy(scores)
        chosen = strategy._select(counts, statistical, penalty, k, np.random.default_rng(seed + 100))
        order = [pool[i] for i in np.random.default_rng(seed + 100).permutation(len(pool))]
        expected = strategy._select_plainly(order, k, plain)
        assert [pool[row].device.id for row, _ in chosen] == [c.device.id for c in expected]
        assert [bonus for _, bonus in chosen] == [plain[c.device.id]["coverage_bonus"] for c in expected]
        assert len(chosen) == min(k, len(pool))


def test_no_selection_ablation_is_random_among_feasible() -> None:
    cands = [cand(i, budget=5 if i == 0 else 100) for i in range(10)]
    s = SmartSplit(selection=False)
    s.round_finished(0, [report(9, 3, 100.0)])  # a device the guided selection would always take
    assert s.name == "smartsplit-no-selection"
    for seed in range(5):
        plan = plan_of(s, cands, 3, seed)
        expected = sample_eligible(cands[1:], 3, np.random.default_rng(seed))
        assert [a.device_id for a in plan.assignments] == [c.device.id for c in expected]
    assert len({plan_of(s, cands, 3, seed).assignments for seed in range(8)}) > 1


def test_deterministic_for_a_seed() -> None:
    cands = random_candidates(np.random.default_rng(7), 40)
    a, b = SmartSplit(), SmartSplit()
    for rnd in range(3):
        pa, pb = plan_of(a, cands, 5, seed=rnd), plan_of(b, cands, 5, seed=rnd)
        assert pa == pb
        reports = [report(x.device_id, x.cut, 1.0 / (1 + x.device_id), busy_s=1.0) for x in pa.assignments]
        a.round_finished(rnd, reports)
        b.round_finished(rnd, reports)


# --------------------------------------------------------------------------- joint cut assignment


def edge_heavy(i: int, edge: int = 0) -> Candidate:
    """Fastest at cut 1 (10 s) but 8 s of that is edge work; cut 2 takes 12 s with 3 s on the edge."""
    return cand(i, rounds=(10.0, 12.0, 30.0), edge_s=(8.0, 3.0, 0.0), edge=edge)


def test_rebalancing_moves_cuts_deeper_when_the_edge_is_the_bottleneck() -> None:
    plan = plan_of(SmartSplit(), [edge_heavy(i) for i in range(4)], 4)  # edge load 32 s > 10 s
    assert [a.cut for a in plan.assignments] == [2, 2, 2, 2]  # load 12 s = slowest device: stop
    assert plan.notes["rebalance_moves"] == 4 and plan.notes["edge_load_s"] == {"0": 12.0}
    assert plan.notes["predicted_latency_s"] == 12.0

    plan = plan_of(SmartSplit(), [edge_heavy(i) for i in range(2)], 2)  # load 16 s > 10 s: one move suffices
    assert sorted(a.cut for a in plan.assignments) == [1, 2] and plan.notes["rebalance_moves"] == 1


def test_rebalancing_leaves_cuts_when_the_edge_is_not_the_bottleneck() -> None:
    plan = plan_of(SmartSplit(), [edge_heavy(0)], 1)  # 8 s of edge work < 10 s round
    assert [a.cut for a in plan.assignments] == [1] and plan.notes["rebalance_moves"] == 0
    plan = plan_of(SmartSplit(), [edge_heavy(i, edge=i) for i in range(4)], 4)  # four edges, one device each
    assert [a.cut for a in plan.assignments] == [1, 1, 1, 1]
    assert plan.notes["edge_load_s"] == {str(i): 8.0 for i in range(4)}


def test_rebalancing_needs_memory_and_speed_to_spare() -> None:
    no_memory = [cand(i, peaks=(10, 200, 300), rounds=(10.0, 12.0, 30.0), edge_s=(8.0, 3.0, 0.0)) for i in range(4)]
    assert [a.cut for a in plan_of(SmartSplit(), no_memory, 4).assignments] == [1, 1, 1, 1]
    too_slow = [cand(i, rounds=(10.0, 40.0, 50.0), edge_s=(8.0, 3.0, 0.0)) for i in range(2)]  # 40 s > 16 s load
    assert [a.cut for a in plan_of(SmartSplit(), too_slow, 2).assignments] == [1, 1]


# --------------------------------------------------------------------------- MEC hook, ablations, logging


def test_mec_fine_tuning_stays_feasible_and_can_be_switched_off() -> None:
    # device 2's edge work (2.5 s of a 3 s round) makes its edge nearly the bottleneck: deeper moves pay there
    cands = [cand(0), cand(1, peaks=(10, 200, 300)), cand(2, rounds=(1.0, 2.0, 3.0), edge_s=(2.5, 1.0, 0.0))]
    mec = FakeMec()
    s = SmartSplit(mec=mec)
    cuts = {a.device_id: a.cut for a in plan_of(s, cands, 3).assignments}
    assert cuts == {0: 3, 1: 1, 2: 2}  # 0 is already at L, 1 cannot hold cut 2, 2 moves 1 -> 2
    assert plan_of(s, cands, 3).notes["mec_moves"] == 1
    off = SmartSplit(mec=FakeMec(), cut_finetuning=False)
    assert {a.device_id: a.cut for a in plan_of(off, cands, 3).assignments} == {0: 3, 1: 1, 2: 1}
    assert off.name == "smartsplit-no-finetuning"

    observations = {0: [(0, 1, np.ones(4)), (1, 1, np.ones(4))], 2: [(0, 1, -np.ones(4))]}
    s.round_finished(0, [report(0, 3, 1.0)], observations)
    (given,) = mec.updates  # each device's observations as step sketches per unit, summed in step order
    assert sorted(given) == [0, 2] and given[0][1].steps == 2 and np.array_equal(given[0][1].total, 2 * np.ones(4))
    assert np.array_equal(given[2][1].total, -np.ones(4))
    assert plan_of(s, cands, 3).notes["unit_importance"] == {"1": 0.1, "2": 0.9}
    s.round_finished(1, [report(0, 3, 1.0)])  # no updates (an engine that does not sketch): nothing to score
    assert len(mec.updates) == 1


def test_mec_nudges_may_not_lengthen_the_round_through_the_shared_edge() -> None:
    """Two devices on one edge: the joint assignment puts them at cuts 1 and 2 (edge 8 + 3 = 11 s, slowest device
    12 s). Unit 2 scoring high asks the device at cut 2 to move shallower, which would load the edge with 16 s:
    refused, and not remembered as a move. Unit 2 scoring low asks the device at cut 1 to move deeper: edge 6 s,
    devices 12 s, no longer than before: taken."""
    from smartsplit.strategies.mec import MecManager

    pair = [edge_heavy(0), edge_heavy(1)]
    joint = plan_of(SmartSplit(), pair, 2)
    joint_cuts = {a.device_id: a.cut for a in joint.assignments}
    assert sorted(joint_cuts.values()) == [1, 2] and joint.notes["predicted_latency_s"] == 12.0

    mec = MecManager(L)
    mec.scores = {2: 0.9}
    plan = plan_of(SmartSplit(mec=mec), pair, 2)
    assert {a.device_id: a.cut for a in plan.assignments} == joint_cuts and plan.notes["mec_moves"] == 0
    assert plan.notes["predicted_latency_s"] == 12.0 and mec.last_move == {}

    mec = MecManager(L)
    mec.scores = {2: 0.1}
    plan = plan_of(SmartSplit(mec=mec), pair, 2)
    assert [a.cut for a in plan.assignments] == [2, 2] and plan.notes["mec_moves"] == 1
    assert plan.notes["predicted_latency_s"] == 12.0 and plan.notes["edge_load_s"] == {"0": 6.0}


def test_mec_moves_deeper_only_where_the_edge_is_nearly_the_bottleneck() -> None:
    """A deeper move takes a unit off the shared edge copy; it is made only to shed work from a busy edge. Device 0
    at cut 1 (10 s, 8 s of it edge work) on an edge of its own, beside a slow device (20 s): its edge's 8 s is
    under 0.8 of the round's 20 s, so a low score for unit 2 does not move it although cut 2 (12 s) would fit.
    With 9 s of edge work beside a device of 11 s, the edge is the round's near-bottleneck and cut 2 (10.5 s)
    keeps the round: the move is made."""
    from smartsplit.strategies.mec import MecManager

    def plan_with(cands):
        mec = MecManager(L)
        mec.scores = {2: 0.1}
        return plan_of(SmartSplit(mec=mec), cands, len(cands))

    light = [cand(0, rounds=(10.0, 12.0, 30.0), edge_s=(8.0, 3.0, 0.0), edge=0),
             cand(1, rounds=(20.0, 20.0, 20.0), edge_s=(0.0, 0.0, 0.0), edge=1)]
    plan = plan_with(light)
    assert [a.cut for a in plan.assignments] == [1, 3] and plan.notes["mec_moves"] == 0

    busy = [cand(0, rounds=(10.0, 10.5, 30.0), edge_s=(9.0, 3.0, 0.0), edge=0),
            cand(1, rounds=(11.0, 11.0, 11.0), edge_s=(0.0, 0.0, 0.0), edge=1)]
    plan = plan_with(busy)
    assert plan.assignments[0].cut == 2 and plan.notes["mec_moves_by_direction"] == {"deeper": 1, "shallower": 0}


def test_real_mec_manager_keeps_cuts_feasible() -> None:
    from smartsplit.strategies.mec import MecManager

    mec = MecManager(5)
    mec.scores = {u: 0.0 for u in range(1, 6)}  # every unit agrees: cuts go one deeper where memory allows
    rng = np.random.default_rng(3)
    s = SmartSplit(mec=mec)
    for rnd in range(5):
        cands = random_candidates(rng, 20)
        by_id = {c.device.id: c for c in cands}
        for a in plan_of(s, cands, 8, rnd, rnd).assignments:
            assert a.cut in by_id[a.device_id].feasible_cuts


def test_names_and_switches() -> None:
    assert SmartSplit().name == "smartsplit" and SmartSplit(8).rules.checkpointing
    s = SmartSplit(checkpointing=False)
    assert s.name == "smartsplit-no-ckpt" and not (s.rules.checkpointing or s.rules.replan or s.rules.move_cut)
    assert SmartSplit(selection=False, checkpointing=False).name == "smartsplit-no-selection-no-ckpt"
    assert SmartSplit(name="custom").name == "custom"


def test_notes_are_json_serialisable_and_strategies_pickle() -> None:
    cands = random_candidates(np.random.default_rng(1), 25)
    strategies = [SmartSplit(mec=FakeMec()), SmartSplit(selection=False), SmartSplit(deadline_s=5.0), Oort(5),
                  LatencyOnly(5)]
    for strategy in strategies:
        plan = plan_of(strategy, cands, 6)
        strategy.round_finished(0, [report(a.device_id, a.cut, 1.0, busy_s=2.0) for a in plan.assignments],
                                {a.device_id: [(0, 1, np.ones(3)), (1, 1, np.zeros(3))] for a in plan.assignments})
        plan = plan_of(strategy, cands, 6, rnd=1)
        text = json.dumps(plan.notes)
        assert json.loads(text) == plan.notes
        assert not {"round", "strategy", "candidates", "excluded", "assignments"} & set(plan.notes)
        clone = pickle.loads(pickle.dumps(strategy))  # resume keeps the learned state
        assert plan_of(clone, cands, 6, seed=4, rnd=2) == plan_of(strategy, cands, 6, seed=4, rnd=2)


# --------------------------------------------------------------------------- baselines


def test_oort_selects_only_whole_model_feasible_devices() -> None:
    cands = [cand(i, budget=25 if i % 3 == 0 else 100) for i in range(12)]  # peak at L is 30
    o = Oort(L)
    for rnd in range(4):
        plan = plan_of(o, cands, 4, seed=rnd, rnd=rnd)
        assert plan.excluded == 4 and len(plan.assignments) == 4
        assert all(a.device_id % 3 != 0 and a.cut == L for a in plan.assignments)
        o.round_finished(rnd, [report(a.device_id, L, 1.0, busy_s=1.0) for a in plan.assignments])


def test_oort_explores_then_exploits_utility() -> None:
    cands = [cand(i, samples=100) for i in range(10)]
    o = Oort(L, epsilon=0.5, min_epsilon=0.5, cutoff=1.0)
    o.round_finished(0, [report(i, L, 3.0 if i == 2 else 0.5) for i in range(8)])  # 8, 9 unseen
    for seed in range(5):
        plan = plan_of(o, cands, 2, seed=seed, rnd=1)
        picks = {a.device_id for a in plan.assignments}
        assert 2 in picks and len(picks & {8, 9}) == 1  # one exploit (the best), one explore
        assert plan.notes["explored"] == 1 and plan.notes["exploited"] == 1
    assert plan_of(Oort(L), cands, 10, rnd=50).notes["epsilon"] == pytest.approx(0.9 * 0.98**50)
    assert plan_of(Oort(L), cands, 10, rnd=500).notes["epsilon"] == 0.3


def test_latency_only_takes_the_fastest_cut_whatever_the_memory() -> None:
    cands = [
        cand(0, budget=5, rounds=(3.0, 1.0, 2.0)),  # fits nothing: still selected, at cut 2
        cand(1, budget=15, rounds=(3.0, 2.0, 1.0)),  # only cut 1 fits: gets cut 3
        cand(2, budget=100, rounds=(1.0, 2.0, 3.0)),
        cand(3, budget=100, rounds=(2.0, 2.0, 2.0)),  # tie: the deeper cut
    ]
    plan = plan_of(LatencyOnly(L), cands, 10)
    assert {a.device_id: a.cut for a in plan.assignments} == {0: 2, 1: 3, 2: 1, 3: 3}
    assert plan.excluded == 0 and plan.notes["cuts_over_budget"] == 2
    picks = {plan_of(LatencyOnly(L), cands, 2, seed).assignments for seed in range(8)}
    assert len(picks) > 1  # random selection
