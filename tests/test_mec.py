"""The MEC manager's statistical importance: step sketches, importance scores, cut moves with hysteresis."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.strategies.mec import MecManager, StepSketches, UpdateSketcher, importance

ALL = (1, 2, 3, 4)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 40), nn.Linear(40, 3)))


def steps_of(means: dict[int, np.ndarray], rng: np.random.Generator, steps: int = 8, noise: float = 0.05) -> dict:
    """Per device, per unit: ``steps`` step sketches around the device's mean for that unit."""
    return {
        k: {u: StepSketches.of([m + noise * rng.normal(size=m.shape) for _ in range(steps)]) for u, m in units.items()}
        for k, units in means.items()
    }


def constructed_round(rng: np.random.Generator, devices: int = 6, dim: int = 64) -> dict[int, dict[int, StepSketches]]:
    """Unit 2: devices pull in opposite directions; unit 3: same direction plus small noise."""
    d2, d3 = rng.normal(size=dim), rng.normal(size=dim)
    return steps_of({k: {2: (1 if k % 2 else -1) * d2, 3: d3} for k in range(devices)}, rng)


def manager_with(scores: dict[int, float], **kw) -> MecManager:
    m = MecManager(4, **kw)
    m.scores = dict(scores)
    return m


def test_importance_bounds() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=16)
    same = [StepSketches.of([u + 0.1 * rng.normal(size=16) for _ in range(6)]) for _ in range(4)]
    assert importance(same) == pytest.approx(0.0)  # devices differ by sampling noise only
    opposite = [StepSketches.of([s * u + 0.01 * rng.normal(size=16) for _ in range(6)]) for s in (1, -1, 1, -1)]
    assert importance(opposite) > 0.99
    assert importance(opposite[:1]) is None  # one device: nothing to compare
    assert importance([*opposite, StepSketches.of([u])]) is None  # a device with one step has no noise estimate
    exact = [StepSketches.of([u, u]), StepSketches.of([u, u])]
    assert importance(exact) is None  # no spread at all
    assert importance(opposite[:2] + same[:1], weights=[1.0, 1.0, 0.0]) > 0.99  # weightless devices do not count
    with pytest.raises(SmartSplitError):
        importance(opposite, weights=[1.0])


def test_step_sketches_summarise_their_steps() -> None:
    g = [np.array([1.0, 0.0]), np.array([3.0, 2.0])]
    s = StepSketches.of(g)
    assert s.steps == 2 and np.array_equal(s.total, [4.0, 2.0]) and s.squares == pytest.approx(1 + 13)
    assert np.allclose(s.mean, [2.0, 1.0])
    # sample variance of the steps ((1+1) + (1+1)) / 1 = 4, over 2 steps: 2
    assert s.noise == pytest.approx(2.0)
    assert StepSketches.of(g[:1]).noise is None


def test_disagreeing_data_score_high_agreeing_low() -> None:
    m = MecManager(4)
    scores = m.update(constructed_round(np.random.default_rng(0)))
    assert scores[2] > m.high and scores[3] < m.low
    assert set(scores) == {2, 3}  # units nobody updated stay unscored


def test_pure_sampling_noise_scores_low_even_with_anticorrelated_steps() -> None:
    """Devices with the same data: a weak common gradient under strong step noise, consecutive steps
    anti-correlated as SGD's are (g_t = mu + n_t - n_(t-1)), which fooled the even/odd estimate."""
    rng = np.random.default_rng(1)
    mu = 0.1 * rng.normal(size=128)
    per_device = {}
    for k in range(8):
        n = rng.normal(size=(11, 128))
        per_device[k] = {1: StepSketches.of([mu + n[t] - n[t - 1] for t in range(1, 11)])}
    assert MecManager(1).update(per_device)[1] < 0.1


def test_units_updated_by_one_device_are_unscored() -> None:
    rng = np.random.default_rng(0)
    m = MecManager(4)
    m.update(steps_of({0: {1: np.ones(3), 2: np.ones(3)}, 1: {2: -np.ones(3)}}, rng))
    assert set(m.scores) == {2} and m.scores[2] > 0.99


def test_smoothing_over_rounds() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=256)
    m = MecManager(2, smoothing=0.5)
    m.update(steps_of({0: {1: u}, 1: {1: -u}}, rng))  # about 1.0, taken as is
    first = m.scores[1]
    assert first == pytest.approx(1.0, abs=1e-3)
    m.update(steps_of({0: {1: u}, 1: {1: u}}, rng))  # noise only: 0 up to a small chance excess
    assert first / 2 <= m.scores[1] <= first / 2 + 0.1
    second = m.scores[1]
    m.update(steps_of({0: {1: u}, 1: {1: u}}, rng))
    assert second / 2 <= m.scores[1] <= second / 2 + 0.1
    kept = m.scores[1]
    m.update(steps_of({0: {1: u}}, rng))  # too few devices this round: score kept
    assert m.scores[1] == kept


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
    rng, u = np.random.default_rng(0), np.ones(64)
    high_round = steps_of({0: {2: u, 3: u}, 1: {2: -u, 3: -u}}, rng)  # units 2 and 3 disagree: score about 1
    low_round = steps_of({0: {2: u, 3: u}, 1: {2: u, 3: u}}, rng)  # they agree: about 0
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
    sketcher, back_sketcher = vars(m).pop("sketcher"), vars(back).pop("sketcher")
    assert vars(back) == vars(m) and back_sketcher.seed == sketcher.seed
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
    per_device: dict[int, dict[int, StepSketches]] = {}
    g = torch.Generator().manual_seed(0)
    for k, sign in enumerate((1.0, -1.0, 1.0, -1.0)):
        unit = nn.Linear(6, 5)
        unit.load_state_dict(net[0].state_dict())
        stats = StepSketches(np.zeros(0))
        for _ in range(4):
            unit.zero_grad()
            (sign * unit(torch.randn(16, 6, generator=g)).sum()).backward()
            stats.add(s.grad_sketch(1, unit))
        per_device[k] = {1: stats}
    assert MecManager(3).update(per_device)[1] > 0.9


def test_real_gradients_iid_small_batches_score_low_label_skew_high() -> None:
    """Linear classifiers on 4 devices, 10 SGD steps of batch 4: the same data distribution (pure sampling
    noise) scores low; each device seeing two of eight classes scores high."""
    torch.manual_seed(0)
    centres = torch.randn(8, 10) * 2
    net = nn.Sequential(nn.Linear(10, 8))
    sketcher = UpdateSketcher(net, 80, seed=0)

    def device_stats(classes: list[int], seed: int) -> StepSketches:
        g = torch.Generator().manual_seed(seed)
        unit = nn.Linear(10, 8)
        unit.load_state_dict(net[0].state_dict())
        opt = torch.optim.SGD(unit.parameters(), lr=0.1)
        stats = StepSketches(np.zeros(0))
        for _ in range(10):
            y = torch.tensor(classes)[torch.randint(len(classes), (4,), generator=g)]
            x = centres[y] + torch.randn(4, 10, generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(unit(x), y).backward()
            stats.add(sketcher.grad_sketch(1, unit))
            opt.step()
        return stats

    iid = {k: {1: device_stats(list(range(8)), k)} for k in range(4)}
    skewed = {k: {1: device_stats([2 * k, 2 * k + 1], k)} for k in range(4)}
    assert MecManager(1).update(iid)[1] < 0.3
    assert MecManager(1).update(skewed)[1] > 0.6
