"""The memory-management settings that make training, evaluation and planning fast in a long-lived process.

glibc serves every block above its mmap threshold (128 KiB, rising with use to at most 32 MiB) with a fresh
``mmap`` and gives it back on ``free``: a conv layer's output for an evaluation batch of 1,000 images is tens
of MiB, so each batch faults its pages in again (benchmarks/allocator.py: 10k Fashion-MNIST test images
through a small CNN at batch 1,000 in 4.6 s, 2.6 s with the thresholds below). Keeping large blocks on the heap, and freed memory in
the process, trades that for a resident set that stays at its high-water mark, which a training process
reaches every round anyway. Values are unchanged: torch allocates with the same alignment either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from contextlib import contextmanager
from typing import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap
TRIM_THRESHOLD = 512 << 20  # free memory at the heap's top kept up to this much


def tune_allocator() -> bool:
    """Apply the thresholds to this process (glibc only; ``SMARTSPLIT_MALLOC=default`` leaves the allocator
    alone). True when applied."""
    if os.environ.get("SMARTSPLIT_MALLOC") == "default" or not hasattr(ctypes, "CDLL"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def freeze_collector() -> None:
    """Leave every object alive now out of the cyclic garbage collector's full passes (``gc.freeze``).

    An experiment over a large fleet holds millions of long-lived objects (devices, traces, shards, cached
    plans); each round creates enough new ones to trigger full passes, and each pass walks all of them: at 10,000
    devices, most of a FedAvg round's planning time. Frozen objects are still freed when their last reference
    goes; only garbage cycles among them stay until ``gc.unfreeze``.
    """
    gc.collect()
    gc.freeze()


@contextmanager
def collector_frozen() -> Iterator[None]:
    """``freeze_collector`` for the ``with`` block."""
    freeze_collector()
    try:
        yield
    finally:
        gc.unfreeze()
