"""Counting the bytes autograd keeps for backward, with saved-tensor hooks: the profiles' exact tensor sizes and
the live step's guard. (Device memory itself is measured by ``meter``.)"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class DeviceOutOfMemory(Exception):
    """The bytes saved during a device forward crossed the device's budget (a simulated out-of-memory)."""

    def __init__(self, saved: int, limit: int) -> None:
        super().__init__(f"saved {saved} bytes for backward, limit {limit}")
        self.saved = saved
        self.limit = limit


class SavedBytes:
    """Running total of distinct storages saved for backward (parameters excluded).

    With a ``limit``, the total is a guard: the save that crosses it raises ``DeviceOutOfMemory`` in the
    middle of the forward, before anything reaches the edge or any weight changes.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), limit: int | None = None) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.total = 0
        self.limit = limit

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.total += storage.nbytes()
        if self.limit is not None and self.total > self.limit:
            raise DeviceOutOfMemory(self.total, self.limit)


    def discount(self, tensor: torch.Tensor) -> None:
        """Stop counting ``tensor`` if it was saved (the cut activation, which the memory model counts apart)."""
        key = tensor.untyped_storage().data_ptr()
        if key in self.seen and key not in self._excluded:
            self.total -= tensor.untyped_storage().nbytes()
            self._excluded.add(key)


@contextmanager
def count_saved_bytes(
    exclude: Iterable[torch.Tensor] = (), meter: SavedBytes | None = None, limit: int | None = None
) -> Iterator[SavedBytes]:
    """Count every distinct storage the forward inside the block saves for backward.

    Parameters (``exclude``) are left out: convolutions and linears save their weight, which the memory
    model already counts once as weights. Passing an existing ``meter`` keeps one de-duplicated total across
    several blocks (a storage saved by two units is counted once, for the first).
    """
    meter = meter if meter is not None else SavedBytes(exclude, limit)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        meter.add(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield meter
