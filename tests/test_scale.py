"""Planning scales with the round, not the fleet: candidates are predicted for the whole fleet at once, in
arrays, each cut when a strategy first reads it, and each figure equals the device planned alone; device roles
and managers exist only for the devices that need them. (Equality with earlier versions is the golden test's
job; the time and memory figures are benchmarks/scale.py's.)"""

from __future__ import annotations

import gc
import pytest

from smartsplit.config import build_config
from smartsplit.engine.experiment import Experiment
from smartsplit.fleet.clock import model_transfer_s, step_times
from smartsplit.roles.device import UNLIMITED
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


@pytest.mark.parametrize("strategy, budgets", [("smartsplit", "foreground"), ("fedavg", "constant")])
def test_fleet_forecasts_equal_each_device_planned_alone(strategy, budgets) -> None:
    """Candidates are predicted for many devices at once, in arrays; each figure must be what the device's own
    on-device manager and the time model give for it alone."""
    x = Experiment(build_config({**FLEET, "strategy": {"name": strategy}},
                                [f"fleet.budgets.kind={budgets}", "fleet.budgets.max_take=0.9", "edge.servers=2"]))
    x.clock_s = 500.0  # budget forecasts over a window of the trace
    candidates = x.candidates()
    assert len({c.budget for c in candidates}) > 10  # many budgets, several plan searches
    micro_batches = set()
    for c in candidates:
        manager, edge = x.manager(c.device.id), x.edge_specs[x.central.edge_of(c.device.id)]
        for cut in range(1, x.num_units + 1):
            plan = manager.plan(cut, c.budget) or manager.plan(cut, UNLIMITED)
            micro_batches.add(plan.micro_batch)
            step = step_times(x.profile, cut, c.device, edge, 1.0, plan.recompute_flops, plan.round_trips)
            assert c.peaks[cut - 1] == plan.peak_bytes
            assert c.step_times[cut - 1] == step.total
            assert c.round_times[cut - 1] == x.local_steps[c.device.id] * step.total + sum(model_transfer_s(x.profile, cut, c.device, edge))
            assert c.edge_times[cut - 1] == x.local_steps[c.device.id] * step.edge_s
            assert type(c.step_times[cut - 1]) is float and type(c.peaks[cut - 1]) is int
    if strategy == "smartsplit":
        assert len(micro_batches) > 1  # devices chose between plans


def test_roles_and_managers_exist_only_for_the_devices_that_need_them() -> None:
    x = Experiment(build_config({**FLEET, "strategy": {"name": "fedavg"}}))
    record = x.run_round(0)
    chosen = sorted(a["device"] for a in record.decision["assignments"])
    assert len(chosen) == 3 and record.decision["candidates"] == 40
    assert sorted(x._device_roles) == chosen
    assert len(x._managers) <= len(chosen) + 1  # theirs, and the one whose shared plan searches the forecasts use


def test_collector_frozen_freezes_for_the_block_only() -> None:
    before = gc.get_freeze_count()
    with collector_frozen():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before


def test_many_candidates_figures_gathered_at_once_equal_each_read_alone() -> None:
    """What SmartSplit's selection reads in arrays (``per_cut_array``, ``feasibility``, the fastest feasible
    round) equals reading each candidate's figures one by one, and the budgets above a cut's ``roomy`` share
    the plan options the search finds for any of them."""
    import numpy as np

    from smartsplit.strategies.base import feasibility, per_cut_array
    from smartsplit.strategies.selection import DeviceHistory

    x = Experiment(build_config({**FLEET, "strategy": {"name": "smartsplit"}},
                                ["fleet.budgets.kind=foreground", "fleet.budgets.max_take=0.9", "edge.servers=2"]))
    x.clock_s = 500.0
    candidates = x.candidates()
    for field in ("peaks", "round_times", "edge_times"):
        got = per_cut_array([getattr(c, field) for c in candidates])
        assert got.tolist() == [list(getattr(c, field)) for c in candidates]
    fits = feasibility(candidates)
    assert [tuple(np.flatnonzero(row) + 1) for row in fits] == [c.feasible_cuts for c in candidates]
    history = DeviceHistory()
    history.speed = {c.device.id: 1.0 + 0.1 * (c.device.id % 3) for c in candidates}
    feasible = [c for c in candidates if c.feasible_cuts]
    fastest = history.fastest(feasible, feasibility(feasible)).tolist()
    assert fastest == [min(history.times(c)[0][cut - 1] for cut in c.feasible_cuts) for c in feasible]
    manager = x.manager(candidates[0].device.id)
    for cut in range(1, x.num_units + 1):
        roomy = manager.roomy(cut)
        assert manager._search(cut, roomy) == manager._search(cut, roomy * 3) == manager._search(cut, roomy + 12345)


def _fleet_experiment(devices: int, strategy: str) -> Experiment:
    return Experiment(build_config({
        "name": "columns", "seed": 3, "meter": False, "strategy": {"name": strategy},
        "data": {"dataset": "synthetic", "synthetic_train": 2 * devices, "synthetic_test": 40, "partition": "iid"},
        "model": {"name": "cnn", "width": 0.25}, "fleet": {"devices": devices},
        "training": {"rounds": 1, "devices_per_round": 3, "local_steps": 1, "batch_size": 2, "grouping": "never"},
    }, ["fleet.budgets.kind=foreground"]))


@pytest.mark.parametrize("strategy", ["smartsplit", "fedavg", "oort"])
def test_the_fleet_is_held_in_columns_not_objects_per_device(strategy) -> None:
    """Devices, shards, label counts and every device's predictions are arrays: after a round is planned, a
    fleet 2,000 devices larger holds fewer than 2 more objects a device (its budget trace is one; an object per
    device for the device, its candidate and its figures was 8 to 9)."""
    alive = []
    for devices in (200, 2200):
        x = _fleet_experiment(devices, strategy)
        x.central.plan_round(0, x.candidates(), 3)
        gc.collect()
        alive.append(len(gc.get_objects()))
        del x
    assert (alive[1] - alive[0]) / 2000 < 2


def test_candidates_columns_are_what_each_candidate_says_and_follow_budget_changes() -> None:
    """The columns a strategy reads equal the ``Candidate`` objects indexing gives; a plan over the columns is the
    plan over the same candidates as a list; when budget forecasts move, the devices whose forecast changed are
    predicted afresh (equal to a new experiment's predictions at that moment)."""
    import numpy as np

    from smartsplit.strategies.base import Candidates
    from smartsplit.strategies.smartsplit import SmartSplit

    x = Experiment(build_config({**FLEET, "strategy": {"name": "smartsplit"}},
                                ["fleet.budgets.kind=foreground", "fleet.budgets.max_take=0.9", "edge.servers=2"]))
    x.clock_s = 500.0
    columns = x.candidates()
    listed = list(columns)
    assert columns.ids.tolist() == [c.device.id for c in listed]
    assert columns.budgets.tolist() == [c.budget for c in listed] and columns.samples.tolist() == [c.samples for c in listed]
    assert columns.edges.tolist() == [c.edge for c in listed]
    assert [tuple(row) for row in columns.label_counts.tolist()] == [c.label_counts for c in listed]
    for name in ("peaks", "step_times", "round_times", "edge_times"):
        assert columns.figure(name).tolist() == [list(getattr(c, name)) for c in listed]
    assert [tuple(np.flatnonzero(row) + 1) for row in columns.feasibility()] == [c.feasible_cuts for c in listed]
    assert columns.fits(2).tolist() == [c.fits(2) for c in listed]
    rows = np.array([5, 1, 30])
    assert [c.device.id for c in columns.take(rows)] == [listed[r].device.id for r in rows]
    assert columns.rows_of([listed[r].device.id for r in rows]).tolist() == rows.tolist()
    plans = [SmartSplit().configure_round(0, given, 4, np.random.default_rng(5)) for given in (columns, listed)]
    assert plans[0] == plans[1] and len(plans[0].assignments) == 4
    assert Candidates.of(listed).figure("round_times").tolist() == columns.figure("round_times").tolist()

    x.clock_s = 1500.0
    later = x.candidates()
    fresh = Experiment(build_config({**FLEET, "strategy": {"name": "smartsplit"}},
                                    ["fleet.budgets.kind=foreground", "fleet.budgets.max_take=0.9", "edge.servers=2"]))
    fresh.clock_s = 1500.0
    again = fresh.candidates()
    assert (later.budgets != columns.budgets).any()  # some forecasts moved
    for name in ("peaks", "round_times", "edge_times"):
        assert later.figure(name).tolist() == again.figure(name).tolist()
