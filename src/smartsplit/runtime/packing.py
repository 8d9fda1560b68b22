"""A call's tensors in one buffer, so that a message to a worker process crosses in one piece.

``multiprocessing`` sends every CPU tensor of a message through shared memory with a file descriptor of its own; a
round's instructions and results hold a hundred or more small tensors (each device's copy of the weights), and
passing their descriptors costs more than copying their bytes. ``pack`` pickles a value with every plain CPU tensor
replaced by a reference into one flat byte buffer (its strides kept, so a channels-last weight stays channels-last);
``unpack`` gives the value back, each tensor copied out of the received buffer into storage of its own (as plain
pickling gives it: what a role holds is what it measures, and the buffer is let go at once). A tensor object that
appears twice in the value comes back as one tensor; a tensor that needs its autograd history, or whose elements are
not one block (a strided slice), is pickled as usual.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import torch

ALIGN = 64  # every tensor starts on a cache line of the buffer


@dataclass(frozen=True)
class Packed:
    skeleton: bytes  # the value pickled, its tensors replaced by indexes into ``tensors``
    tensors: tuple[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]], ...]  # offset, dtype, shape, stride
    buffer: torch.Tensor  # uint8: every tensor's bytes


def _dense(t: torch.Tensor) -> bool:
    """``t``'s elements lie in one block in either of the layouts tensors here have (contiguous, channels-last)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


class _Packer(pickle.Pickler):
    def __init__(self, file) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}

    def persistent_id(self, obj):
        if (type(obj) is not torch.Tensor or obj.device.type != "cpu" or obj.layout != torch.strided
                or obj.requires_grad or obj.is_quantized or not _dense(obj)):
            return None
        if id(obj) not in self._index:
            self._index[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return self._index[id(obj)]


class _Unpacker(pickle.Unpickler):
    def __init__(self, file, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]


def pack(value) -> Packed:
    skeleton = io.BytesIO()
    packer = _Packer(skeleton)
    packer.dump(value)
    layout, offset = [], 0
    for t in packer.tensors:
        layout.append((offset, t.dtype, tuple(t.shape), tuple(t.stride())))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8)
    for t, view in zip(packer.tensors, _views(buffer, layout)):
        view.copy_(t)
    return Packed(skeleton.getvalue(), tuple(layout), buffer)


def unpack(packed: Packed):
    tensors = [view.clone() for view in _views(packed.buffer, packed.tensors)]  # clone keeps the strides
    return _Unpacker(io.BytesIO(packed.skeleton), tensors).load()


def _views(buffer: torch.Tensor, layout) -> list[torch.Tensor]:
    views = []
    for offset, dtype, shape, stride in layout:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        flat = buffer[offset : offset + size].view(dtype)
        views.append(flat.as_strided(shape, stride))
    return views
