"""The MEC manager's statistical importance: update sketches, disagreement scores, cut moves with hysteresis."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.managers.mec import MecManager, UpdateSketcher, disagreement

ALL = (1, 2, 3, 4)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 40), nn.Linear(40, 3)))


def constructed_round(rng: np.random.Generator, devices: int = 6, dim: int = 64) -> dict[int, dict[int, np.ndarray]]:
    """Unit 2: devices pull in opposite directions; unit 3: same direction plus small noise."""
    d2, d3 = rng.normal(size=dim), rng.normal(size=dim)
    return {
        k: {2: (1 if k % 2 else -1) * d2 + 0.05 * rng.normal(size=dim), 3: d3 + 0.05 * rng.normal(size=dim)}
        for k in range(devices)
    }


def manager_with(scores: dict[int, float], **kw) -> MecManager:
    m = MecManager(4, **kw)
    m.scores = dict(scores)
    return m


def test_disagreement_bounds() -> None:
    u = np.array([1.0, -2.0, 3.0])
    assert disagreement([u, u, u]) == pytest.approx(0.0)
    assert disagreement([u, -u]) == pytest.approx(1.0)
    assert disagreement([u]) is None
    assert disagreement([np.zeros(3), np.zeros(3)]) is None
    v = disagreement([u, 0.5 * u + 1.0, -u + 0.3])
    assert v is not None and 0.0 <= v <= 1.0
    # weights: a device with no weight does not count
    assert disagreement([u, u, -u], weights=[1.0, 1.0, 0.0]) == pytest.approx(0.0)
    with pytest.raises(SmartSplitError):
        disagreement([u, u], weights=[1.0])


def test_opposite_updates_score_high_aligned_low() -> None:
    m = MecManager(4)
    scores = m.update(constructed_round(np.random.default_rng(0)))
    assert scores[2] > m.high and scores[3] < m.low
    assert set(scores) == {2, 3}  # units nobody updated stay unscored


def test_units_updated_by_one_device_are_unscored() -> None:
    m = MecManager(4)
    m.update({0: {1: np.ones(3), 2: np.ones(3)}, 1: {2: -np.ones(3)}})
    assert m.scores == {2: pytest.approx(1.0)}


def test_smoothing_over_rounds() -> None:
    u = np.array([1.0, 2.0])
    m = MecManager(2, smoothing=0.5)
    m.update({0: {1: u}, 1: {1: -u}})  # 1.0, taken as is
    assert m.scores[1] == pytest.approx(1.0)
    m.update({0: {1: u}, 1: {1: u}})  # 0.0
    assert m.scores[1] == pytest.approx(0.5)
    m.update({0: {1: u}, 1: {1: u}})
    assert m.scores[1] == pytest.approx(0.25)
    m.update({0: {1: u}})  # too few updates this round: score kept
    assert m.scores[1] == pytest.approx(0.25)


def test_invalid_parameters_named() -> None:
    with pytest.raises(SmartSplitError, match="high"):
        MecManager(4, high=0.3, low=0.6)
    with pytest.raises(SmartSplitError, match="high"):
        MecManager(4, high=0.5, low=0.5)
    with pytest.raises(SmartSplitError, match="smoothing"):
        MecManager(4, smoothing=1.0)
    with pytest.raises(SmartSplitError, match="cooldown"):
        MecManager(4, cooldown=-1)


def test_adjust_shallower_when_last_device_unit_high() -> None:
    assert manager_with({2: 0.9}).adjust(0, 2, ALL) == 1


def test_adjust_deeper_when_first_edge_unit_low() -> None:
    assert manager_with({3: 0.1}).adjust(0, 2, ALL) == 3


def test_adjust_keeps_cut_between_thresholds_or_unscored() -> None:
    assert manager_with({2: 0.45, 3: 0.45}).adjust(0, 2, ALL) == 2
    assert manager_with({}).adjust(0, 2, ALL) == 2
    assert manager_with({1: 0.0, 4: 1.0}).adjust(0, 2, ALL) == 2  # only units cut and cut+1 count


def test_adjust_high_device_unit_wins_over_low_edge_unit() -> None:
    assert manager_with({2: 0.9, 3: 0.1}).adjust(0, 2, ALL) == 1
    assert manager_with({2: 0.9, 3: 0.1}).adjust(0, 2, (2, 3)) == 2  # can't go shallower: stay, don't go deeper


def test_adjust_respects_feasible_cuts_and_bounds() -> None:
    assert manager_with({1: 0.9}).adjust(0, 1, ALL) == 1  # never below 1
    assert manager_with({3: 0.9}).adjust(0, 3, (3, 4)) == 3  # 2 does not fit
    assert manager_with({3: 0.1}).adjust(0, 2, (1, 2)) == 2  # 3 does not fit memory
    assert manager_with({4: 0.1}).adjust(0, 3, (1, 2, 3)) == 3  # never above the max feasible cut
    assert manager_with({5: 0.1}).adjust(0, 4, (1, 2, 3, 4, 5)) == 4  # never past the last unit


def test_cooldown_prevents_flapping() -> None:
    u = np.ones(4)
    high_round = {0: {2: u, 3: u}, 1: {2: -u, 3: -u}}  # units 2 and 3 disagree: score 1
    low_round = {0: {2: u, 3: u}, 1: {2: u, 3: u}}
    m = MecManager(4, smoothing=0.0, cooldown=1)
    cut, cuts = 3, []
    for rnd in range(8):
        m.update(high_round if rnd % 2 == 0 else low_round)
        cut = m.adjust(7, cut, ALL)
        cuts.append(cut)
    assert cuts[0] == 2  # unit 3 disagreed: shallower
    moves = [(rnd, b - a) for rnd, (a, b) in enumerate(zip([3, *cuts], cuts)) if b != a]
    assert len(moves) <= len(cuts) // 2, cuts  # far from a move every round
    for (r0, d0), (r1, d1) in zip(moves, moves[1:]):
        assert d0 == d1 or r1 - r0 > 1, cuts  # a reversal waits out the cooldown
    # without a cooldown the same scores make the cut flap every round
    m0, cut0, cuts0 = MecManager(4, smoothing=0.0, cooldown=0), 3, []
    for rnd in range(4):
        m0.update(high_round if rnd % 2 == 0 else low_round)
        cut0 = m0.adjust(7, cut0, ALL)
        cuts0.append(cut0)
    assert cuts0 == [2, 3, 2, 3]


def test_cooldown_expires_and_is_per_device() -> None:
    m = manager_with({2: 0.9}, cooldown=1)
    assert m.adjust(0, 2, ALL) == 1
    m.scores = {2: 0.1}
    assert m.adjust(0, 1, ALL) == 1  # same round: blocked
    assert m.adjust(1, 1, ALL) == 2  # another device is free to move
    m.update({})
    assert m.adjust(0, 1, ALL) == 1  # one round later: still within cooldown
    m.update({})
    assert m.adjust(0, 1, ALL) == 2  # two rounds later: allowed
    m.scores = {1: 0.9}
    assert m.adjust(0, 1, ALL) == 1  # 1 is the bound anyway
    m.scores = {2: 0.9}
    assert m.adjust(0, 2, ALL) == 2  # just moved deeper: shallower waits


def test_manager_pickles_with_state() -> None:
    m = MecManager(4, high=0.7, low=0.2, smoothing=0.3, cooldown=2)
    m.update(constructed_round(np.random.default_rng(1)))
    m.adjust(3, 2, ALL)
    back = pickle.loads(pickle.dumps(m))
    assert vars(back) == vars(m)
    nxt = constructed_round(np.random.default_rng(2))
    assert back.update(nxt) == m.update(nxt)
    assert back.adjust(3, 1, ALL) == m.adjust(3, 1, ALL)


def test_sketcher_same_seed_same_coordinates() -> None:
    a, b = UpdateSketcher(model(), 16, seed=3), UpdateSketcher(model(), 16, seed=3)
    c = UpdateSketcher(model(), 16, seed=4)
    for i in (1, 3):
        assert all(np.array_equal(x, y) for x, y in zip(a.positions[i], b.positions[i]))
    assert not np.array_equal(a.positions[3][1], c.positions[3][1])
    assert len(a.positions[1][0]) == 16
    assert len(UpdateSketcher(model(), 10_000).positions[1][0]) == 6 * 5 + 5  # capped at the unit's size
    # coordinates are spread over all the unit's parameters
    params = set(UpdateSketcher(model(), 200, seed=0).positions[3][0].tolist())
    assert params == {0, 1, 2, 3}


def test_sketcher_reads_grads_and_weights() -> None:
    net = model()
    s = UpdateSketcher(net, 1024, seed=0)  # more coordinates than unit 1 has: all of them
    unit = net[0]
    assert np.array_equal(s.grad_sketch(1, unit), np.zeros(35))  # no grads yet
    unit.weight.grad = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    param, flat = s.positions[1]
    g = s.grad_sketch(1, unit)
    assert g.dtype == np.float64
    assert np.array_equal(g[param == 0], flat[param == 0].astype(np.float64))
    assert np.array_equal(g[param == 1], np.zeros(5))  # bias grad is None
    unit.bias.grad = torch.full((5,), 2.0)
    assert np.array_equal(s.grad_sketch(1, unit)[param == 1], np.full(5, 2.0))
    w = s.weight_sketch(1, unit)
    values = [unit.weight.detach().reshape(-1), unit.bias.detach()]
    assert np.allclose(w, [values[p][f].item() for p, f in zip(param, flat)])
    # a trained copy of the unit is read at the same positions
    copy = nn.Linear(6, 5)
    copy.weight.grad = torch.ones(5, 6)
    assert np.array_equal(s.grad_sketch(1, copy)[param == 0], np.ones(30))


def test_sketcher_empty_for_parameter_free_units() -> None:
    s = UpdateSketcher(model(), 8)
    assert s.grad_sketch(2, nn.ReLU()).shape == (0,)
    assert s.weight_sketch(2, nn.ReLU()).shape == (0,)
    with pytest.raises(SmartSplitError):
        s.grad_sketch(1, nn.Linear(3, 3))  # not the unit it was sketched from
    with pytest.raises(SmartSplitError):
        s.grad_sketch(9, nn.ReLU())


def test_sketches_feed_the_manager() -> None:
    """Grad sketches of devices trained on opposite targets disagree on the unit they share."""
    net = model()
    s = UpdateSketcher(net, 64, seed=0)
    per_device: dict[int, dict[int, np.ndarray]] = {}
    x = torch.randn(16, 6)
    for k, sign in enumerate((1.0, -1.0, 1.0, -1.0)):
        unit = nn.Linear(6, 5)
        unit.load_state_dict(net[0].state_dict())
        (sign * unit(x).sum()).backward()
        per_device[k] = {1: s.grad_sketch(1, unit)}
    m = MecManager(3)
    assert m.update(per_device)[1] == pytest.approx(1.0)


def test_noise_alone_scores_low_with_split_halves():
    """Devices sampling one distribution disagree only by noise; even/odd halves let the score discount it."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=200)
    same, opposite = {}, {}
    for k in range(6):
        steps = [0.1 * signal + rng.normal(size=200) for _ in range(10)]  # weak signal, strong noise
        halves = np.stack([sum(steps[0::2]), sum(steps[1::2])])
        same[k] = {1: halves}
        flipped = [(-1) ** k * 1.0 * signal + rng.normal(size=200) for _ in range(10)]
        opposite[k] = {1: np.stack([sum(flipped[0::2]), sum(flipped[1::2])])}
    naive = disagreement([same[k][1].sum(axis=0) for k in same])
    calibrated = MecManager(1).update(same)[1]
    assert naive > 0.6  # the raw normalised variance calls pure noise "disagreement"
    assert calibrated < 0.15
    assert MecManager(1).update(opposite)[1] > 0.6  # real disagreement survives the correction
