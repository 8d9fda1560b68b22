"""What an experiment is built from, each piece a function of the config: the fleet, its budget and availability
traces, the model checked on the data, the memory meter, and a device's on-device manager. The simulator
(``engine.experiment``) and the deployment's processes build from the same functions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smartsplit.config import Config
from smartsplit.data import Dataset
from smartsplit.errors import SmartSplitError
from smartsplit.fleet import (
    AvailabilityTrace,
    BudgetTraces,
    Device,
    Fleet,
    always_online,
    fleet_from_csv,
    foreground_app_trace,
    load_availability_csv,
    load_catalog,
    load_trace_csv,
    on_off_trace,
    sample_fleet,
)
from smartsplit.kernels.structure import in_memory_format, structure_of
from smartsplit.machine import one_line
from smartsplit.memory.ondevice import OnDeviceManager, PlanMemo
from smartsplit.meter.heap import HeapMeter, MeterUnavailable, ShippedFigures, shim_path
from smartsplit.models.profile import ModelProfile
from smartsplit.models.zoo import build_model
from smartsplit.roles.device import OptimizerSpec

log = logging.getLogger(__name__)


def build_fleet(config: Config) -> Fleet:
    f = config.fleet
    if f.csv is not None:
        devices = sorted(fleet_from_csv(f.csv), key=lambda d: d.id)
        if len(devices) != f.devices:
            raise SmartSplitError(f"fleet.csv: {f.csv} lists {len(devices)} devices but fleet.devices is {f.devices}")
        if [d.id for d in devices] != list(range(len(devices))):
            raise SmartSplitError(f"fleet.csv: device ids in {f.csv} must be 0..{len(devices) - 1}")
        return Fleet.of(devices)
    catalog = load_catalog(f.catalog)
    return _named("fleet.classes", sample_fleet)(f.devices, f.classes, seed=config.seed, catalog=catalog, jitter=f.jitter)


def _trace_files(field: str, csv_dir: str, devices: list[Device]) -> dict[int, Path]:
    """The ``device-<id>.csv`` files of a trace folder, by device id; a folder missing or holding a file that
    matches no device is refused."""
    folder = Path(csv_dir)
    if not folder.is_dir():
        raise SmartSplitError(f"{field}: {csv_dir} is not a folder (expected device-<id>.csv files)")
    expected = {f"device-{d.id}.csv": d.id for d in devices}
    stray = sorted(p.name for p in folder.glob("*.csv") if p.name not in expected)
    if stray:
        raise SmartSplitError(f"{field}: {folder / stray[0]} matches no device (the fleet's files are "
                              f"device-0.csv .. device-{len(devices) - 1}.csv); rename or remove it")
    return {expected[p.name]: p for p in folder.glob("*.csv")}


def build_traces(config: Config, devices: Fleet) -> BudgetTraces:
    """One memory-budget trace per device, on the experiment's clock; seeded per device. A constant budget is the
    device's memory, kept as a number (``BudgetTraces``)."""
    b = config.fleet.budgets
    files = _trace_files("fleet.budgets.csv_dir", b.csv_dir, devices) if b.kind == "csv" else {}
    constants = devices.memory_bytes.copy()
    own = {}
    for device_id in (range(len(devices)) if b.kind == "foreground" else sorted(files)):
        if b.kind == "foreground":
            own[device_id] = foreground_app_trace(
                int(devices.memory_bytes[device_id]), seed=config.seed * 100_003 + device_id, horizon_s=b.horizon_s,
                mean_gap_s=b.mean_gap_s, mean_hold_s=b.mean_hold_s, max_take=b.max_take, floor=b.floor,
            )
        else:
            own[device_id] = load_trace_csv(files[device_id])
        constants[device_id] = -1
    return BudgetTraces(constants, own)


def build_availability(config: Config, devices: list[Device]) -> list[AvailabilityTrace]:
    """One availability trace per device, on the experiment's clock; seeded per device."""
    a = config.fleet.availability
    files = _trace_files("fleet.availability.csv_dir", a.csv_dir, devices) if a.kind == "csv" else {}
    traces, online = [], always_online()  # one object for every device that is always online: it never changes
    for device in devices:
        if a.kind == "on_off":
            traces.append(on_off_trace([config.seed, 7, device.id], a.mean_on_s, a.mean_off_s, a.horizon_s))
        elif device.id in files:
            traces.append(load_availability_csv(files[device.id]))
        else:
            traces.append(online)
    return traces


def _named(field: str, build):
    """``build``, its user errors prefixed with the config field they come from."""

    def wrapped(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except SmartSplitError as exc:
            message = str(exc)
            raise SmartSplitError(message if message.startswith(field) else f"{field}: {message}") from None

    return wrapped


def _check_on_data(model: nn.Sequential, data: Dataset, name: str) -> None:
    """Run the model on two real examples before any round: a model that does not fit the data fails here, in
    one line, not mid-run."""
    batch = data.x[:2]
    try:
        with torch.no_grad():
            out = model(batch)
    except Exception as exc:
        raise SmartSplitError(f"model.name {name!r}: the model does not run on {data.name} examples of shape "
                              f"{tuple(data.shape)} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(batch), data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SmartSplitError(f"model.name {name!r}: the model's output is {got} for {len(batch)} examples; it must be "
                              f"(batch, {data.num_classes}), one score per class of {data.name}")


def build_architecture(config: Config, train: Dataset, *, structure_only: bool = False) -> nn.Sequential:
    """The config's model for ``train``'s examples, checked on two of them (seeded weights). ``structure_only``:
    its structure, parameters on the meta device and never allocated (a device's: the weights it trains come in
    each round's instructions, and the server checked the model on data)."""
    build = _named("model.name", build_model)
    args = dict(in_channels=train.shape[0], num_classes=train.num_classes, width=config.model.width,
                input_size=train.shape[1], seed=config.seed)
    if structure_only:
        try:
            with torch.device("meta"):
                return in_memory_format(structure_of(build(config.model.name, **args)), config.memory_format)
        except Exception as exc:  # noqa: BLE001 - a model whose construction needs real tensors is built, then let go
            log.info("model.name %r cannot be built on the meta device (%s): built once and let go",
                     config.model.name, type(exc).__name__)
            return in_memory_format(structure_of(build(config.model.name, **args)), config.memory_format)
    model = in_memory_format(build(config.model.name, **args), config.memory_format)
    _check_on_data(model, train, config.model.name)
    return model


def device_manager(config: Config, profile_at: Callable[[int], ModelProfile], optimizer: OptimizerSpec,
                   device: Device, checkpointing: bool, memo: PlanMemo | None = None) -> OnDeviceManager:
    """The on-device manager of ``device`` (the central server keeps one per device too, to predict plans)."""
    return OnDeviceManager(profile_at, config.training.batch_size, optimizer.slots, device.flops_per_s,
                           round_trip_s=2 * config.edge.latency_s, checkpointing=checkpointing, memo=memo,
                           resolution=config.fleet.budgets.resolution)


def start_meter(config: Config) -> HeapMeter | None:
    """The memory meter of ``config`` (figures shipped with SmartSplit unless ``calibrate``), or None (with a
    warning) where it cannot run: runs then plan with uncalibrated profiles and record no measured peaks."""
    try:
        shim_path()
    except MeterUnavailable as e:
        log.warning("%s; device peaks will not be measured and plans rest on saved-tensor profiles only", e)
        return None
    return HeapMeter(config.threads, shipped=None if config.calibrate else ShippedFigures())


def profile_sources(meter: HeapMeter | None) -> dict:
    """Which memory profiles a run planned from: ``shipped`` with SmartSplit (and the machine they were measured
    on), ``host`` (measured on this machine), or ``none`` (meter off: saved-tensor sizes alone); with how many
    figures came from each."""
    if meter is None:
        return {"source": "none"}
    if meter.shipped is None:
        return {"source": "host", **meter.used()}
    return {"source": "shipped", **meter.used(), "shipped_from": one_line(meter.shipped.machine) if meter.shipped.machine else None}
