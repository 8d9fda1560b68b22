"""The memory meter, a leaf the memory model does not own: the live heap of a child process (``heap``) and the
procedures it runs there (``procedures``: one device step under a plan, each unit alone)."""

from smartsplit.meter.heap import HeapMeter, MeterUnavailable, UnitCost, cache_root, shim_path

__all__ = ["HeapMeter", "MeterUnavailable", "UnitCost", "cache_root", "shim_path"]
