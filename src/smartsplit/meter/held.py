"""What a holder of tensors really holds: the bytes of every distinct storage reachable from what it keeps, a walk
of the objects themselves, not a figure of the memory model."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def held_bytes(modules: Iterable[nn.Module] = (), tensors: Iterable[torch.Tensor | None] = (),
               optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the storages behind ``modules``' parameters, buffers and gradients, ``tensors`` and the optimizer's
    state, each storage once (views share theirs); meta tensors hold nothing."""
    found = [t for t in tensors if t is not None]
    for module in modules:
        params = list(module.parameters())
        found += [*params, *module.buffers(), *(p.grad for p in params if p.grad is not None)]
    if optimizer is not None:
        found += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in found:
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
