"""Per-unit profiles, measured on a real forward pass."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from smartsplit.meter.heap import HeapMeter, UnitCost, cached_json, structure, torch_version
from smartsplit.kernels.saved import count_saved_bytes
from smartsplit.kernels.structure import one_at_a_time


BACKWARD_FLOPS = 2  # a unit's backward costs about twice its forward FLOPs


@dataclass(frozen=True)
class UnitProfile:
    """One unit at one batch size. Bytes are exact storage sizes; FLOPs are forward FLOPs."""

    index: int  # 1-based position in the chain
    name: str
    param_bytes: int
    internal_bytes: int  # saved for backward other than the unit's input and output (parameters excluded)
    saves_input: bool  # the unit saves its input tensor for backward
    saves_output: bool  # the unit saves its output tensor for backward
    output_bytes: int  # what crosses the link when the cut is after this unit
    flops: int
    input_bytes: int = 0
    cost: UnitCost | None = None  # what the meter saw the unit need alone (None: profiled without the meter)

    @property
    def saved_bytes(self) -> int:
        """Everything this unit alone saves for backward (its input and output included when it saves them)."""
        return self.internal_bytes + self.saves_input * self.input_bytes + self.saves_output * self.output_bytes


@dataclass(frozen=True)
class ModelProfile:
    input_shape: tuple[int, ...]  # per example, e.g. (1, 28, 28)
    batch: int
    dtype: str
    input_bytes: int
    units: tuple[UnitProfile, ...]

    @property
    def metered(self) -> bool:
        """Every unit carries the meter's figures, so ``device_memory`` is an upper bound of the meter."""
        return all(u.cost is not None for u in self.units)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def unit(self, index: int) -> UnitProfile:
        return self.units[index - 1]

    def device_units(self, cut: int) -> tuple[UnitProfile, ...]:
        return self.units[:cut]

    def edge_units(self, cut: int) -> tuple[UnitProfile, ...]:
        return self.units[cut:]

    def cut_bytes(self, cut: int) -> int:
        """Bytes of the activation crossing the link per step (0 at cut = L: nothing crosses)."""
        return 0 if cut >= self.num_units else self.unit(cut).output_bytes

    def param_bytes(self, first: int, last: int) -> int:
        """Parameter bytes of units ``first..last`` (1-based, inclusive)."""
        return self._param_totals[_span(first, last, self.num_units)] - self._param_totals[first - 1]

    def flops(self, first: int, last: int) -> int:
        """Forward FLOPs of units ``first..last`` (1-based, inclusive)."""
        return self._flop_totals[_span(first, last, self.num_units)] - self._flop_totals[first - 1]

    # Running totals (integers, so exact): every cut of every device asks for them.
    @cached_property
    def _param_totals(self) -> tuple[int, ...]:
        return (0, *itertools.accumulate(u.param_bytes for u in self.units))

    @cached_property
    def _flop_totals(self) -> tuple[int, ...]:
        return (0, *itertools.accumulate(u.flops for u in self.units))


def _span(first: int, last: int, num_units: int) -> int:
    """The running total's index for units ``first..last``: none when ``last < first``, at most every unit."""
    return max(min(last, num_units), first - 1)


def profile_chain(
    units: nn.Sequential,
    input_shape: tuple[int, ...],
    batch: int,
    dtype: torch.dtype = torch.float32,
    meter: HeapMeter | None = None,
    optimizer: tuple[str, float, float] = ("sgd", 0.01, 0.9),
) -> ModelProfile:
    """Run one forward of ``units`` on a random batch and measure every unit.

    Each unit's saved storages are split into its input, its output and the rest, so that the memory
    model can tell which tensors two neighbouring units share and what a checkpointed segment still holds.
    With a ``meter``, each unit is also measured alone under it (forward, backward and ``optimizer`` step: what
    it needs beyond what it saves), which makes the memory model an upper bound of the meter.
    The model's weights are not changed. The forward's figures are cached on disk (``cache_root()/profiles``),
    keyed by the model's structure, the source of its non-PyTorch module classes, the input shape, batch, dtype
    and torch version; the meter keeps its own.
    """
    costs = meter.unit_costs(units, input_shape, batch, optimizer) if meter is not None else (None,) * len(units)
    key = [PROFILE_VERSION, torch_version(), structure(units), code_digest(units), tuple(input_shape), batch, str(dtype)]
    rows = cached_json("profiles", "units", key, lambda: _unit_rows(units, input_shape, batch, dtype))
    profiles = [UnitProfile(**row, cost=cost) for row, cost in zip(rows, costs)]
    return ModelProfile(
        input_shape=tuple(input_shape),
        batch=batch,
        dtype=str(dtype).removeprefix("torch."),
        input_bytes=math.prod((batch, *input_shape)) * torch.empty((), dtype=dtype).element_size(),
        units=tuple(profiles),
    )


def _unit_rows(units: nn.Sequential, input_shape: tuple[int, ...], batch: int, dtype: torch.dtype) -> list[dict]:
    """Each unit's saved, output and input bytes and its FLOPs, from one forward on a seeded random batch."""
    from torch.utils.flop_counter import FlopCounterMode  # its first use costs seconds: only on a cache miss

    x = torch.randn((batch, *input_shape), dtype=dtype, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.enable_grad():
        h = x
        for i, unit in enumerate(one_at_a_time(units), start=1):  # a device's structure: never all units at once
            flop_counter = FlopCounterMode(display=False)
            with count_saved_bytes(exclude=list(unit.parameters())) as saved, flop_counter:
                out = unit(h)
            boundary = {_storage(h): _nbytes(h), _storage(out): _nbytes(out)}
            internal = saved.total - sum(n for key, n in boundary.items() if key in saved.seen)
            rows.append(dict(
                index=i,
                name=type(unit).__name__ if not isinstance(unit, nn.Sequential) else _describe(unit),
                param_bytes=sum(p.numel() * p.element_size() for p in unit.parameters()),
                internal_bytes=internal,
                saves_input=_storage(h) in saved.seen,
                saves_output=_storage(out) in saved.seen and _storage(out) != _storage(h),
                output_bytes=_nbytes(out),
                flops=int(flop_counter.get_total_flops()),
                input_bytes=_nbytes(h),
            ))
            h = out.detach().requires_grad_(out.requires_grad)  # the same storage, without the graph of the units before
    return rows


def code_digest(units: nn.Module) -> str:
    """The source of every module class in ``units`` that is not PyTorch's own (whose code the torch version
    names): a user model whose ``forward`` changed is profiled again, even if its structure did not."""
    digest = hashlib.sha256()
    for cls in sorted({type(m) for m in units.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if not cls.__module__.startswith("torch."):
            try:
                digest.update(inspect.getsource(cls).encode())
            except (OSError, TypeError):
                digest.update(b"?")  # no source to read (defined in a notebook cell or built at run time)
    return digest.hexdigest()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _describe(unit: nn.Sequential) -> str:
    return "+".join(type(m).__name__ for m in unit.children())


PROFILE_VERSION = 1  # bump when what profile_chain measures changes, so cached profiles are measured again


class ProfileCache:
    """Profiles keyed by (model key, input shape, batch, dtype); one per experiment, not global.

    With a ``meter``, profiles carry the meter's per-unit figures for ``optimizer``."""

    def __init__(self, meter: HeapMeter | None = None, optimizer: tuple[str, float, float] = ("sgd", 0.01, 0.9)) -> None:
        self._profiles: dict[tuple, ModelProfile] = {}
        self.meter = meter
        self.optimizer = optimizer

    def get(self, key: str, units: nn.Sequential, input_shape: tuple[int, ...], batch: int, dtype: torch.dtype = torch.float32) -> ModelProfile:
        cache_key = (key, tuple(input_shape), batch, str(dtype))
        if cache_key not in self._profiles:
            self._profiles[cache_key] = profile_chain(units, input_shape, batch, dtype, self.meter, self.optimizer)
        return self._profiles[cache_key]
