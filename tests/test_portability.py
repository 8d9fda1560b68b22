"""Runs plan from the memory profiles shipped with SmartSplit, so a config and seed plan alike on every machine;
``calibrate`` measures on this one instead. (Float kernels across CPU kinds: ``tests/test_golden.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from smartsplit.config import load_config
from smartsplit.data import load_data
from smartsplit.data.datasets import FASHION_MNIST_ROOT
from smartsplit.engine.build import build_architecture, profile_sources, start_meter
from smartsplit.machine import describe, kernel_fingerprint, one_line
from smartsplit.memory.ondevice import micro_batch_sizes
from smartsplit.meter.heap import MEASUREMENT_VERSION, HeapMeter, MeterUnavailable, ShippedFigures, shim_path, structure
from smartsplit.models.profile import ProfileCache
from smartsplit.reports.summary import profiles_line

ROOT = Path(__file__).resolve().parent.parent


def tiny_units() -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), nn.Linear(8, 4))


def shipped_file(tmp_path: Path, figures: dict) -> ShippedFigures:
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps({"measurement_version": MEASUREMENT_VERSION, "machine": describe(), "figures": figures}))
    return ShippedFigures(path)


def step_request(batch: int) -> dict:
    return dict(input_shape=(16,), batch=batch, micro_batch=batch, segments=(), optimizer=("sgd", 0.01, 0.9),
                num_classes=4, to_edge=True)


def test_a_shipped_figure_is_used_without_measuring_and_a_missing_one_is_measured_here(tmp_path):
    units = tiny_units()
    key = ShippedFigures.key("step", 1, structure(units), step_request(8))
    meter = HeapMeter(threads=1, cache=False, shipped=shipped_file(tmp_path, {key: 123_456}))
    try:
        assert meter.step_peak(units, (16,), 8, num_classes=4) == 123_456
        assert meter._proc is None  # nothing was measured: the child process never started
        assert meter.used() == {"shipped": 1, "host": 0}
        try:
            shim_path()
        except MeterUnavailable as e:
            pytest.skip(f"the memory meter cannot run here: {e}")
        measured = meter.step_peak(units, (16,), 4, num_classes=4)  # another batch: not shipped
        assert measured > 0 and measured != 123_456 and meter.used() == {"shipped": 1, "host": 1}
    finally:
        meter.close()


def test_figures_of_another_measurement_version_are_never_used(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"measurement_version": MEASUREMENT_VERSION - 1, "figures": {"k": 1}}))
    assert ShippedFigures(path).get("k") is None


def test_the_shipped_file_is_of_this_meter_and_names_its_machine():
    shipped = ShippedFigures()
    data = json.loads(shipped.path.read_text())
    assert data["measurement_version"] == MEASUREMENT_VERSION, "regenerate: python scripts/ship_profiles.py"
    assert shipped.figures and data["command"] == "python scripts/ship_profiles.py"
    assert set(kernel_fingerprint()) <= set(shipped.machine) and shipped.machine["cpu"]


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed (`bash scripts/install-data.sh`)")
@pytest.mark.parametrize("config_name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_plans_from_shipped_unit_costs_alone(config_name):
    """What plans rest on (each unit's costs at every micro-batch size the planner tries) is shipped for every
    config in ``configs/``: their plans are the machine's own nowhere."""
    small = ["data.synthetic_train=64", "data.synthetic_test=16"] if config_name == "latency-vgg.yaml" else \
        ["data.train_limit=200", "data.test_limit=50"]
    config = load_config(ROOT / "configs" / config_name, small)
    meter = start_meter(config)
    if meter is None:
        pytest.skip("the memory meter cannot run here")
    train, _ = load_data(config)
    units = build_architecture(config, train)
    t = config.training
    profiles = ProfileCache(meter, (t.optimizer, t.lr, t.momentum))
    try:
        for micro_batch in micro_batch_sizes(t.batch_size):
            assert profiles.get(config.model.name, units, train.shape, micro_batch).metered
    finally:
        meter.close()
    sources = profile_sources(meter)
    assert sources["source"] == "shipped" and sources["host"] == 0, sources
    assert sources["shipped"] == len(micro_batch_sizes(t.batch_size))


def test_calibrate_measures_here_and_the_line_says_which_profiles():
    host = profile_sources(HeapMeter(threads=1, shipped=None))
    assert host["source"] == "host" and "measured on this machine" in profiles_line([host])
    shipped = {"source": "shipped", "shipped": 7, "host": 2, "shipped_from": one_line(describe())}
    line = profiles_line([shipped, {**shipped, "host": 0}])
    assert "shipped with SmartSplit" in line and "14 figures" in line and "2 figures not shipped" in line
    assert "none (meter off" in profiles_line([profile_sources(None)])


def test_the_machine_fingerprint_sees_a_forced_capability(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert kernel_fingerprint()["pins"]["ATEN_CPU_CAPABILITY"] == "default"
    assert kernel_fingerprint()["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
