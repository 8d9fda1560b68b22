"""A model's structure without its weights, and units made real from it one at a time.

A device keeps only the structure of the model (``structure_of``: its parameters on PyTorch's meta device, which
have shapes and dtypes but no storage) and makes the units it trains real from the weights a message carries
(``materialise``): it never holds units beyond its cut. ``with_stand_ins`` gives a structure seeded stand-in
weights, and ``one_at_a_time`` each unit so, for work that needs a forward (profiling, shapes, the memory meter's
steps) without holding the whole model at once.
"""

from __future__ import annotations

import copy
from typing import Iterator, Mapping

import torch
from torch import nn


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def in_memory_format(model: nn.Module, memory_format: str) -> nn.Module:
    """``model``, its 4-D parameters (convolution weights) laid out in ``memory_format`` ("contiguous": PyTorch's
    default; "channels_last": channels innermost, which oneDNN's CPU convolutions and pooling run faster), in place.
    Activations follow the weights' layout; the arithmetic is the same up to floating-point order."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory format {memory_format!r} is not one of {', '.join(MEMORY_FORMATS)}")
    return model.to(memory_format=MEMORY_FORMATS[memory_format]) if memory_format != "contiguous" else model


def channels_last(t: torch.Tensor) -> bool:
    """``t`` is laid out channels-last (and is 4-D with a layout that differs from the contiguous one)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _laid_out_like(t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``t`` in ``reference``'s layout (a copy only when it differs: weights that crossed a wire come contiguous)."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last(reference) and not channels_last(t) else t


def structure_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (buffers, small and untrained, stay as they
    are); ``model`` itself when it already is one. Its weights are never allocated, not even for a moment."""
    if is_structure(model):
        return model
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def is_structure(model: nn.Module) -> bool:
    """Every parameter of ``model`` is on the meta device (a model without parameters is one too)."""
    return all(p.is_meta for p in model.parameters())


def materialise(units: nn.Module, states: Mapping[int, Mapping[str, torch.Tensor]]) -> nn.Module:
    """A real copy of a chain's ``units`` (a structure or a real model), its unit ``i`` (1-based in ``units``)
    holding ``states[i]``: the tensors themselves, not copies, so a message's weights become the unit's once
    loaded. Every parameter must be given (a unit missing from ``states`` keeps its own weights only if they are
    real)."""
    real = copy.deepcopy(units)
    for index, state in states.items():
        unit = real[index - 1]
        own = unit.state_dict(keep_vars=True)
        unit.load_state_dict({k: _laid_out_like(v, own[k]) if k in own else v for k, v in state.items()}, assign=True)
    left = [name for name, p in real.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"no weights for {', '.join(left[:3])}: a unit made from a structure needs its state")
    return real


def with_stand_ins(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """``module`` when it is real, else a copy with seeded stand-in weights: for work whose figures do not depend
    on the values (profiling a forward, measuring a step's memory)."""
    if not any(p.is_meta for p in module.parameters()):
        return module
    generator = generator or torch.Generator().manual_seed(0)
    real = copy.deepcopy(module)
    for name, p in list(real.named_parameters()):
        if p.is_meta:
            module_name, _, leaf = name.rpartition(".")
            value = torch.empty_like(p, device="cpu").copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator) * 0.05)
            real.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=p.requires_grad)
    return real


def one_at_a_time(units: nn.Sequential) -> Iterator[nn.Module]:
    """Each unit of ``units``, real (``with_stand_ins``), made one at a time: the whole model is never held."""
    generator = torch.Generator().manual_seed(0)
    for unit in units:
        yield with_stand_ins(unit, generator)


def warm_up(units: nn.Sequential, input_shape: tuple[int, ...], batch: int) -> None:
    """One forward and backward of every unit at ``batch`` examples, one unit at a time with stand-in weights and
    let go: what the runtime keeps after its first steps of a shape (oneDNN's primitive cache, autograd's engine,
    the allocator's pools) is then already taken, before a memory limit is set on what comes next."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn((batch, *input_shape), generator=generator)
    for index, unit in enumerate(one_at_a_time(units)):
        x = h.detach().requires_grad_(index > 0)
        out = unit(x)
        if out.requires_grad:
            out.backward(torch.ones_like(out))
        h = out.detach()
        del unit, out, x
