"""The memory meter, a leaf the memory model does not own: the live heap of a child process (``heap``), and the
saved-tensor counting that gives exact activation sizes and the live step's guard (``saved``)."""

from smartsplit.meter.heap import HeapMeter, MeterUnavailable, UnitCost, cache_root, shim_path
from smartsplit.meter.saved import DeviceOutOfMemory, SavedBytes, count_saved_bytes

__all__ = ["DeviceOutOfMemory", "HeapMeter", "MeterUnavailable", "SavedBytes", "UnitCost", "cache_root",
           "count_saved_bytes", "shim_path"]
