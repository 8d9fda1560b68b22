"""Fleet catalog, sampler, CSV scenarios and memory-budget traces."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from smartsplit.errors import SmartSplitError
from smartsplit.fleet import (
    BudgetTrace,
    Device,
    constant_trace,
    fleet_from_csv,
    fleet_to_csv,
    foreground_app_trace,
    load_catalog,
    load_trace_csv,
    sample_fleet,
    save_trace_csv,
)

MIB = 2**20
EXPECTED_CLASSES = {
    "mcu",
    "mcu-psram",
    "wearable",
    "phone-entry",
    "phone-mid",
    "rpi4",
    "jetson-nano",
    "jetson-tx2",
    "jetson-xavier-nx",
}


# ---------------------------------------------------------------- catalog


def test_shipped_catalog_loads_with_positive_figures() -> None:
    cat = load_catalog()
    assert set(cat) == EXPECTED_CLASSES
    for name, c in cat.items():
        assert c.name == name
        assert c.memory_mb > 0 and c.gflops > 0 and c.uplink_mbps > 0 and c.downlink_mbps > 0
        assert c.description


def test_catalog_spans_the_memory_wall() -> None:
    mems = [c.memory_mb for c in load_catalog().values()]
    assert min(mems) < 10
    assert max(mems) > 1024


def test_every_catalog_figure_has_a_source_comment() -> None:
    text = (Path(__file__).parents[1] / "src/smartsplit/fleet/catalog.yaml").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().split(":")[0] in {"memory_mb", "gflops", "uplink_mbps"}:
            assert lines[i - 1].strip().startswith("#"), f"no comment above line {i + 1}: {line}"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a: {memory_mb: 1, gflops: 1, uplink_mbps: 1}\n", "downlink_mbps"),
        ("a: {memory_mb: -1, gflops: 1, uplink_mbps: 1, downlink_mbps: 1}\n", "memory_mb"),
        ("a: {memory_mb: x, gflops: 1, uplink_mbps: 1, downlink_mbps: 1}\n", "memory_mb"),
        ("a: {memory_mb: 1, gflops: 1, uplink_mbps: 1, downlink_mbps: 1, ram: 2}\n", "ram"),
        ("a: [1, 2\n", "YAML"),
        ("", "non-empty"),
    ],
)
def test_bad_catalog_file_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path / "cat.yaml", text)
    with pytest.raises(SmartSplitError) as err:
        load_catalog(path)
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_missing_catalog_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SmartSplitError, match="nope.yaml"):
        load_catalog(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- sampler


def test_sampler_counts_match_proportions() -> None:
    fleet = sample_fleet(10, {"mcu": 1, "phone-mid": 1, "rpi4": 1}, seed=0)
    counts = Counter(d.device_class for d in fleet)
    assert sum(counts.values()) == 10
    assert sorted(counts.values()) == [3, 3, 4]
    fleet = sample_fleet(100, {"wearable": 0.25, "phone-entry": 0.5, "jetson-nano": 0.25, "mcu": 0}, seed=1)
    assert Counter(d.device_class for d in fleet) == {"wearable": 25, "phone-entry": 50, "jetson-nano": 25}
    assert [d.id for d in fleet] == list(range(100))


def test_sampler_is_reproducible_and_heterogeneous() -> None:
    props = {"phone-entry": 0.5, "phone-mid": 0.5}
    a, b = sample_fleet(20, props, seed=7), sample_fleet(20, props, seed=7)
    assert a == b
    assert a != sample_fleet(20, props, seed=8)
    mems = {d.memory_bytes for d in a if d.device_class == "phone-mid"}
    assert len(mems) > 1
    # shuffled: classes are not in blocks
    classes = [d.device_class for d in a]
    assert classes != sorted(classes) and classes != sorted(classes, reverse=True)


def test_sampler_without_jitter_uses_class_figures() -> None:
    cat = load_catalog()
    (d,) = sample_fleet(1, {"rpi4": 1}, seed=0, jitter=0.0)
    c = cat["rpi4"]
    assert d.memory_bytes == round(c.memory_mb * MIB)
    assert d.flops_per_s == pytest.approx(c.gflops * 1e9)
    assert d.uplink_bytes_per_s == pytest.approx(c.uplink_mbps * 1e6 / 8)
    assert d.downlink_bytes_per_s == pytest.approx(c.downlink_mbps * 1e6 / 8)


def test_unknown_class_lists_known_ones() -> None:
    with pytest.raises(SmartSplitError) as err:
        sample_fleet(5, {"toaster": 1.0}, seed=0)
    msg = str(err.value)
    assert "toaster" in msg and "rpi4" in msg and "mcu-psram" in msg


@pytest.mark.parametrize(
    "props, needle",
    [({"mcu": -0.5, "rpi4": 1}, "mcu"), ({"mcu": 0, "rpi4": 0}, "zero"), ({}, "empty")],
)
def test_bad_proportions_error(props: dict[str, float], needle: str) -> None:
    with pytest.raises(SmartSplitError, match=needle):
        sample_fleet(5, props, seed=0)


def test_fleet_csv_round_trip(tmp_path: Path) -> None:
    fleet = sample_fleet(30, {c: 1 for c in EXPECTED_CLASSES}, seed=3)
    path = tmp_path / "fleet.csv"
    fleet_to_csv(fleet, path)
    assert fleet_from_csv(path) == fleet


@pytest.mark.parametrize(
    "text, line",
    [
        ("id,class\n", 1),
        (
            "id,device_class,memory_bytes,flops_per_s,uplink_bytes_per_s,downlink_bytes_per_s\n"
            "0,mcu,x,1,1,1\n",
            2,
        ),
        (
            "id,device_class,memory_bytes,flops_per_s,uplink_bytes_per_s,downlink_bytes_per_s\n"
            "0,mcu,1,1,1,1\n1,mcu,-1,1,1,1\n",
            3,
        ),
    ],
)
def test_bad_fleet_csv_errors(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path / "fleet.csv", text)
    with pytest.raises(SmartSplitError) as err:
        fleet_from_csv(path)
    assert str(path) in str(err.value) and f"line {line}" in str(err.value)


# ---------------------------------------------------------------- traces


@pytest.fixture
def hand_trace() -> BudgetTrace:
    # 100 on [0,10), 40 on [10,15), 80 on [15,30), 40 from 30 on
    return BudgetTrace((0.0, 10.0, 15.0, 30.0), (100, 40, 80, 40))


def test_trace_at(hand_trace: BudgetTrace) -> None:
    assert hand_trace.at(0.0) == 100
    assert hand_trace.at(9.999) == 100
    assert hand_trace.at(10.0) == 40
    assert hand_trace.at(20.0) == 80
    assert hand_trace.at(1e9) == 40
    assert hand_trace.at(-1.0) == 100


def test_trace_next_change(hand_trace: BudgetTrace) -> None:
    assert hand_trace.next_change(0.0) == 10.0
    assert hand_trace.next_change(10.0) == 15.0
    assert hand_trace.next_change(29.0) == 30.0
    assert hand_trace.next_change(30.0) is None
    assert constant_trace(5).next_change(0.0) is None
    # a breakpoint that keeps the same budget is not a change
    assert BudgetTrace((0.0, 1.0, 2.0), (5, 5, 7)).next_change(0.0) == 2.0


def test_trace_min_and_quantile(hand_trace: BudgetTrace) -> None:
    assert hand_trace.min_over(0.0, 10.0) == 100  # half-open: the drop at 10 is not in [0, 10)
    assert hand_trace.min_over(0.0, 10.5) == 40
    assert hand_trace.min_over(16.0, 16.0) == 80
    # over [0, 40): 100 for 10 s, 40 for 15 s, 80 for 15 s
    assert hand_trace.quantile(0.0, 0.0, 40.0) == 40
    assert hand_trace.quantile(0.3, 0.0, 40.0) == 40
    assert hand_trace.quantile(0.375, 0.0, 40.0) == 40
    assert hand_trace.quantile(0.4, 0.0, 40.0) == 80
    assert hand_trace.quantile(0.75, 0.0, 40.0) == 80
    assert hand_trace.quantile(0.8, 0.0, 40.0) == 100
    assert hand_trace.quantile(1.0, 0.0, 40.0) == 100
    with pytest.raises(SmartSplitError):
        hand_trace.quantile(1.5, 0.0, 1.0)
    with pytest.raises(SmartSplitError):
        hand_trace.min_over(5.0, 1.0)


def test_trace_validation() -> None:
    with pytest.raises(SmartSplitError):
        BudgetTrace((1.0,), (5,))
    with pytest.raises(SmartSplitError):
        BudgetTrace((0.0, 2.0, 2.0), (1, 2, 3))
    with pytest.raises(SmartSplitError):
        BudgetTrace((0.0,), (-1,))
    assert constant_trace(123).at(99.0) == 123


def test_foreground_trace_deterministic_bounded_and_changing() -> None:
    cap = 512 * MIB
    a = foreground_app_trace(cap, seed=11, horizon_s=3600.0)
    assert a == foreground_app_trace(cap, seed=11, horizon_s=3600.0)
    assert a != foreground_app_trace(cap, seed=12, horizon_s=3600.0)
    assert a.at(0.0) == cap
    assert len(a.times_s) > 20
    assert all(0.05 * cap <= b <= cap for b in a.budgets_bytes)
    assert a.min_over(0.0, 3600.0) < cap
    assert a.times_s[-1] < 3600.0
    assert all(x != y for x, y in zip(a.budgets_bytes, a.budgets_bytes[1:]))
    # heavy load hits the floor but never goes below it
    busy = foreground_app_trace(cap, seed=1, horizon_s=3600.0, mean_gap_s=5.0, mean_hold_s=120.0, floor=0.1)
    assert min(busy.budgets_bytes) == pytest.approx(0.1 * cap, abs=1)
    assert busy.quantile(0.1, 0.0, 3600.0) <= busy.quantile(0.9, 0.0, 3600.0)


def test_trace_csv_round_trip(tmp_path: Path) -> None:
    trace = foreground_app_trace(300 * MIB + 17, seed=5, horizon_s=1000.0)
    path = tmp_path / "trace.csv"
    save_trace_csv(trace, path)
    assert load_trace_csv(path) == trace
    assert path.read_text().splitlines()[0] == "time_s,budget_mb"


def test_trace_csv_uses_mib(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "time_s,budget_mb\n0,64\n2.5,16.5\n")
    trace = load_trace_csv(path)
    assert trace.budgets_bytes == (64 * MIB, round(16.5 * MIB))
    assert trace.times_s == (0.0, 2.5)


@pytest.mark.parametrize(
    "text, line",
    [
        ("", 1),
        ("time,budget\n0,1\n", 1),
        ("time_s,budget_mb\n", 2),
        ("time_s,budget_mb\n0,10\n5,abc\n", 3),
        ("time_s,budget_mb\n0,10\n5,-1\n", 3),
        ("time_s,budget_mb\n0,10\n5,8\n5,9\n", 4),
        ("time_s,budget_mb\n0,10\n5,8\n3,9\n", 4),
        ("time_s,budget_mb\n1,10\n", 2),
        ("time_s,budget_mb\n0,10,3\n", 2),
        ("time_s,budget_mb\n0,nan\n", 2),
    ],
)
def test_bad_trace_csv_errors(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path / "trace.csv", text)
    with pytest.raises(SmartSplitError) as err:
        load_trace_csv(path)
    msg = str(err.value)
    assert str(path) in msg and f"line {line}:" in msg and "\n" not in msg


def test_missing_trace_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(SmartSplitError, match="missing.csv"):
        load_trace_csv(tmp_path / "missing.csv")


def test_device_is_plain_data() -> None:
    d = Device(0, "mcu", 1, 1.0, 1.0, 1.0)
    assert d.memory_bytes == 1


def test_a_fleet_is_columns_that_index_as_devices() -> None:
    from smartsplit.fleet import Device, Fleet

    fleet = sample_fleet(50, {"wearable": 1, "phone-entry": 2, "rpi4": 1}, seed=2)
    devices = list(fleet)
    assert isinstance(fleet, Fleet) and all(isinstance(d, Device) for d in devices)
    assert [d.id for d in devices] == list(range(50)) and fleet[-1] == devices[49] and fleet[3:5] == devices[3:5]
    assert Fleet.of(devices) == fleet == devices
    assert fleet.speeds[:, 0].tolist() == [d.flops_per_s for d in devices]
    assert all(type(d.memory_bytes) is int and type(d.uplink_bytes_per_s) is float for d in devices)
    with pytest.raises(SmartSplitError, match="0..1 in order"):
        Fleet.of([devices[1], devices[0]])


def test_budget_traces_keep_constant_budgets_as_numbers_and_forecast_as_each_trace_does(tmp_path: Path) -> None:
    """``BudgetTraces``: a constant budget is a number (its trace made when read, equal to ``constant_trace``);
    a changing one is its own trace; ``forecast`` gives every device's ``BudgetTrace.quantile`` at once."""
    import numpy as np

    from smartsplit.config import build_config
    from smartsplit.engine.build import build_fleet, build_traces
    from smartsplit.fleet import BudgetTraces

    raw = {"fleet": {"devices": 40, "classes": {"wearable": 0.5, "rpi4": 0.5}}}
    fleet = build_fleet(build_config(raw))
    constant = build_traces(build_config(raw), fleet)
    assert isinstance(constant, BudgetTraces) and not constant.own  # no trace object per device
    assert list(constant) == [constant_trace(d.memory_bytes) for d in fleet]
    folder = tmp_path / "traces"
    folder.mkdir()
    (folder / "device-3.csv").write_text("time_s,budget_mb\n0,4\n10,2\n20,6\n")
    mixed = build_traces(build_config(raw, ["fleet.budgets.kind=csv", f"fleet.budgets.csv_dir={folder}"]), fleet)
    assert list(mixed.own) == [3] and mixed[3] == load_trace_csv(folder / "device-3.csv") and mixed[4] == constant[4]
    foreground = build_traces(build_config(raw, ["fleet.budgets.kind=foreground"]), fleet)
    assert len(foreground.own) == 40 and (foreground.constants == -1).all()
    ids = np.array([7, 3, 0, 39, 3])
    for traces in (constant, mixed, foreground, BudgetTraces.of(list(foreground))):
        for q, t0, t1 in ((0.1, 0.0, 0.0), (0.1, 5.0, 25.0), (0.5, 0.0, 300.0), (1.0, 12.0, 13.0)):
            assert traces.forecast(ids, q, t0, t1).tolist() == [traces[i].quantile(q, t0, t1) for i in ids.tolist()]
    with pytest.raises(ValueError, match="not both"):
        BudgetTraces(np.array([5, -1]), {0: constant_trace(5)})
