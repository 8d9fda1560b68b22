"""Devices that come and go: offline devices are not selected; a device that leaves mid-round drops out then."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from smartsplit.config import build_config
from smartsplit.engine.experiment import Experiment
from smartsplit.errors import SmartSplitError
from smartsplit.fleet import AvailabilityTrace, load_availability_csv, on_off_trace, save_availability_csv
from smartsplit.fleet.clock import step_times
from smartsplit.models.profile import profile_chain
from test_engine import BATCH, EDGE, SGD, SHAPE, batches, chain, dataset, device, part, play_round

STEPS = 4


def leaves_at(seconds: float) -> AvailabilityTrace:
    return AvailabilityTrace((0.0, seconds), (True, False))


def test_a_device_that_leaves_mid_round_counts_exactly_its_finished_steps() -> None:
    """Two devices at cut 1 on one shared edge. Device 1 goes offline in the middle of its third step: its two
    finished steps count on its own copy and on the edge, its third never runs, the edge is let go (device 0
    is not held up), and the round ends without it."""
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    stay = part(model, device(0), 1, 10**9, batches(*[BATCH] * STEPS, start=0))
    full = play_round(model, [stay, part(model, device(1), 1, 10**9, batches(*[BATCH] * STEPS, start=32))],
                     data, profile, [EDGE], SGD)[1]
    # when device 1's third step would have begun its forward, plus a little
    third_start = full[1]["finish_s"] / STEPS * 2 + step_times(profile, 1, device(1), EDGE).forward_s / 2
    leaver = dataclasses.replace(part(model, device(1), 1, 10**9, batches(*[BATCH] * STEPS, start=32)),
                                 availability=leaves_at(third_start))
    groups, reports, _ = play_round(model, [stay, leaver], data, profile, [EDGE], SGD)
    kept, left = reports
    assert not kept["dropped_out"] and kept["steps"] == STEPS
    assert left["dropped_out"] and left["steps"] == 2 and left["samples"] == 2 * BATCH
    assert left["finish_s"] == pytest.approx(third_start)  # it leaves at that moment
    assert kept["finish_s"] <= full[0]["finish_s"] + 1e-9  # the edge was let go: device 0 no later than before

    contributions = groups[0]
    device_copies = sorted(c.samples[1] for c in contributions if 3 not in c.units)
    edge_copy = [c for c in contributions if 3 in c.units][0]
    assert device_copies == [2 * BATCH, STEPS * BATCH]  # device 1's update as of its last finished step
    assert edge_copy.samples == {2: (STEPS + 2) * BATCH, 3: (STEPS + 2) * BATCH}


def test_a_device_offline_from_the_start_trains_nothing_and_the_round_goes_on() -> None:
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    gone = dataclasses.replace(part(model, device(1), 2, 10**9, batches(BATCH, BATCH)), availability=leaves_at(1e-6))
    groups, reports, _ = play_round(model, [part(model, device(0), 2, 10**9, batches(BATCH, BATCH)), gone],
                                   data, profile, [EDGE], SGD)
    assert reports[1]["dropped_out"] and reports[1]["steps"] == 0 and reports[0]["steps"] == 2
    assert all(c.samples.get(1, 0) in (0, 2 * BATCH) for c in groups[0])


def test_on_off_traces_are_seeded_and_round_trip_through_csv(tmp_path: Path) -> None:
    a = on_off_trace([3, 7, 1], mean_on_s=100, mean_off_s=50, horizon_s=5000)
    assert a == on_off_trace([3, 7, 1], mean_on_s=100, mean_off_s=50, horizon_s=5000)
    assert a != on_off_trace([3, 7, 2], mean_on_s=100, mean_off_s=50, horizon_s=5000)
    assert len(a.times_s) > 20 and set(a.online) == {True, False}
    online = sum(b - t for t, b, on in zip(a.times_s, [*a.times_s[1:], 5000], a.online) if on) / 5000
    assert 0.45 < online < 0.9  # about 100 / 150 of the time online
    save_availability_csv(a, tmp_path / "device-0.csv")
    assert load_availability_csv(tmp_path / "device-0.csv") == a
    assert a.offline_from(0.0) == (0.0 if not a.online[0] else a.times_s[1])
    (tmp_path / "bad.csv").write_text("time_s,online\n0,1\n10,2\n")
    with pytest.raises(SmartSplitError, match="bad.csv: line 3: online must be 1 or 0"):
        load_availability_csv(tmp_path / "bad.csv")


TINY = {
    "name": "avail", "seed": 2,
    "data": {"dataset": "synthetic", "synthetic_train": 200, "synthetic_test": 50},
    "model": {"name": "cnn", "width": 0.25},
    "fleet": {"devices": 8, "classes": {"wearable": 1.0},
              "availability": {"kind": "on_off", "mean_on_s": 20.0, "mean_off_s": 20.0}},
    "training": {"rounds": 4, "devices_per_round": 4, "local_steps": 6, "batch_size": 8, "eval_batch_size": 64},
    "strategy": {"name": "fedavg"},
}


def test_offline_devices_are_never_selected_and_drop_outs_are_recorded() -> None:
    experiment = Experiment(build_config(TINY))
    records = []
    try:
        for rnd in range(4):
            start = experiment.clock_s
            online = {d.id for d in experiment.devices if experiment.availability[d.id].online_at(start)}
            record = experiment.run_round(rnd)
            chosen = {a["device"] for a in record.decision["assignments"]}
            assert chosen <= online and record.offline == len(experiment.devices) - len(online)
            records.append(record)
    finally:
        experiment.close()
    assert sum(r.offline for r in records) > 0 and sum(r.dropouts for r in records) > 0
    assert all(r.dropouts == sum(d.dropped_out for d in r.devices) for r in records)


def test_with_everyone_online_availability_changes_nothing(tmp_path: Path) -> None:
    """An empty trace folder (every device always online) runs exactly as no availability at all."""
    always = {**TINY, "fleet": {**TINY["fleet"], "availability": {"kind": "always"}}}
    empty = {**always, "fleet": {**always["fleet"], "availability": {"kind": "csv", "csv_dir": str(tmp_path)}}}
    a, b = Experiment(build_config(always)), Experiment(build_config(empty))
    try:
        ra, rb = a.run_round(0), b.run_round(0)
    finally:
        a.close(), b.close()
    assert ra.accuracy == rb.accuracy and ra.dropouts == rb.dropouts == 0
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
