"""Fleet: device catalog, seeded fleet sampling, memory-budget and availability traces."""

from smartsplit.fleet.catalog import (
    Device,
    DeviceClass,
    Fleet,
    fleet_from_csv,
    fleet_to_csv,
    load_catalog,
    sample_fleet,
)
from smartsplit.fleet.traces import (
    AvailabilityTrace,
    BudgetTrace,
    BudgetTraces,
    always_online,
    load_availability_csv,
    on_off_trace,
    save_availability_csv,
    constant_trace,
    foreground_app_trace,
    load_trace_csv,
    save_trace_csv,
)

__all__ = [
    "AvailabilityTrace",
    "BudgetTrace",
    "BudgetTraces",
    "always_online",
    "load_availability_csv",
    "on_off_trace",
    "save_availability_csv",
    "Device",
    "DeviceClass",
    "Fleet",
    "constant_trace",
    "fleet_from_csv",
    "fleet_to_csv",
    "foreground_app_trace",
    "load_catalog",
    "load_trace_csv",
    "sample_fleet",
    "save_trace_csv",
]
