"""The memory meter, a leaf the memory model does not own: the live heap of a child process (``heap``) and the
procedures it runs there (``procedures``: one device step under a plan, each unit alone); and what a device role
really holds (``held``: a walk of its tensors' storages)."""

from smartsplit.meter.heap import HeapMeter, MeterUnavailable, UnitCost, cache_root, shim_path
from smartsplit.meter.held import held_bytes

__all__ = ["HeapMeter", "MeterUnavailable", "UnitCost", "cache_root", "held_bytes", "shim_path"]
