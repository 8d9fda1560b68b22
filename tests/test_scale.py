"""Planning scales with the round, not the fleet: a candidate's figures at a cut are predicted when a strategy
reads them, so a strategy that looks at one cut plans the fleet at that cut only and the sampled devices at the
rest; device roles and managers exist only for the devices that need them. (Equality with what planning gave
before is the golden test's job; the time and memory figures are benchmarks/scale.py's.)"""

from __future__ import annotations

import gc
from collections import defaultdict

import pytest

from smartsplit.config import build_config
from smartsplit.engine.experiment import Experiment
from smartsplit.memory.ondevice import OnDeviceManager
from smartsplit.runtime.allocator import collector_frozen
from smartsplit.strategies import PerCut

FLEET = {
    "name": "fleet", "seed": 3, "meter": False,
    "data": {"dataset": "synthetic", "synthetic_train": 400, "synthetic_test": 40},
    "model": {"name": "cnn", "width": 1.0},
    "fleet": {"devices": 40, "classes": {"mcu-psram": 0.3, "wearable": 0.4, "phone-entry": 0.3}},
    "training": {"rounds": 1, "devices_per_round": 3, "local_steps": 2, "batch_size": 16},
}


def test_per_cut_figures_are_computed_once_when_read() -> None:
    asked = []

    def figure(cut: int) -> int:
        asked.append(cut)
        return 10 * cut

    peaks = PerCut(4, figure)
    assert asked == [] and len(peaks) == 4
    assert peaks[2] == 30 and peaks[-1] == 40 and peaks[2] == 30
    assert asked == [3, 4]  # each cut once, only those read
    assert tuple(peaks) == (10, 20, 30, 40) and peaks == (10, 20, 30, 40) and peaks[1:3] == (20, 30)
    assert sorted(asked) == [1, 2, 3, 4]
    with pytest.raises(IndexError, match="cut 5 is outside 1..4"):
        peaks[4]


def planned_cuts(monkeypatch) -> dict[OnDeviceManager, set[int]]:
    cuts: dict[OnDeviceManager, set[int]] = defaultdict(set)
    plan = OnDeviceManager.plan

    def recording(self, cut, budget):
        cuts[self].add(cut)
        return plan(self, cut, budget)

    monkeypatch.setattr(OnDeviceManager, "plan", recording)
    return cuts


@pytest.mark.parametrize("strategy", ["fedavg", "splitfed-v1"])
def test_a_fixed_cut_strategy_plans_the_fleet_at_its_cut_and_the_sampled_devices_at_every_cut(monkeypatch, strategy) -> None:
    cuts = planned_cuts(monkeypatch)
    x = Experiment(build_config({**FLEET, "strategy": {"name": strategy}}))
    record = x.run_round(0)
    cut, L = x.strategy.cut, x.num_units
    chosen = {a["device"] for a in record.decision["assignments"]}
    assert len(chosen) == 3 and record.decision["candidates"] == 40
    for device in x.devices:
        asked = cuts[x.manager(device.id)] if device.id in x._managers else set()
        if device.id in chosen:  # its decision lists its feasible cuts: every cut predicted
            assert asked == set(range(1, L + 1))
        else:
            assert asked == {cut}, f"device {device.id} was planned at cuts {sorted(asked)}"
    assert sorted(x._device_roles) == sorted(chosen)  # roles only for the devices that trained


def test_collector_frozen_freezes_for_the_block_only() -> None:
    before = gc.get_freeze_count()
    with collector_frozen():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before
