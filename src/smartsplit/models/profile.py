"""Per-unit profiles, measured on a real forward pass (DESIGN 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from smartsplit.memory.measure import SavedBytes, count_saved_bytes


@dataclass(frozen=True)
class UnitProfile:
    """One unit at one batch size. Bytes are exact storage sizes; FLOPs are forward FLOPs."""

    index: int  # 1-based position in the chain
    name: str
    param_bytes: int
    saved_bytes: int  # saved for backward, parameters excluded, storages already saved by earlier units excluded
    output_bytes: int  # what crosses the link when the cut is after this unit
    flops: int


@dataclass(frozen=True)
class ModelProfile:
    input_shape: tuple[int, ...]  # per example, e.g. (1, 28, 28)
    batch: int
    dtype: str
    input_bytes: int
    units: tuple[UnitProfile, ...]

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
        return sum(u.param_bytes for u in self.units[first - 1 : last])

    def flops(self, first: int, last: int) -> int:
        return sum(u.flops for u in self.units[first - 1 : last])


def profile_chain(units: nn.Sequential, input_shape: tuple[int, ...], batch: int, dtype: torch.dtype = torch.float32) -> ModelProfile:
    """Run one forward of ``units`` on a random batch and measure every unit.

    Saved bytes are de-duplicated across the whole chain, so summing ``saved_bytes`` over units
    ``1..c`` gives what the device really keeps. The model's weights are not changed.
    """
    x = torch.randn((batch, *input_shape), dtype=dtype, generator=torch.Generator().manual_seed(0))
    # The input batch is counted once by the memory model as the input, not as an activation.
    meter = SavedBytes(exclude=[*units.parameters(), x])
    profiles = []
    with torch.enable_grad():
        h = x.requires_grad_(False)
        for i, unit in enumerate(units, start=1):
            before = meter.total
            flop_counter = FlopCounterMode(display=False)
            with count_saved_bytes(meter=meter), flop_counter:
                h = unit(h)
            profiles.append(
                UnitProfile(
                    index=i,
                    name=type(unit).__name__ if not isinstance(unit, nn.Sequential) else _describe(unit),
                    param_bytes=sum(p.numel() * p.element_size() for p in unit.parameters()),
                    saved_bytes=meter.total - before,
                    output_bytes=h.numel() * h.element_size(),
                    flops=int(flop_counter.get_total_flops()),
                )
            )
    return ModelProfile(
        input_shape=tuple(input_shape),
        batch=batch,
        dtype=str(dtype).removeprefix("torch."),
        input_bytes=x.numel() * x.element_size(),
        units=tuple(profiles),
    )


def _describe(unit: nn.Sequential) -> str:
    return "+".join(type(m).__name__ for m in unit.children())


class ProfileCache:
    """Profiles keyed by (model key, input shape, batch, dtype); one per experiment, not global."""

    def __init__(self) -> None:
        self._profiles: dict[tuple, ModelProfile] = {}

    def get(self, key: str, units: nn.Sequential, input_shape: tuple[int, ...], batch: int, dtype: torch.dtype = torch.float32) -> ModelProfile:
        cache_key = (key, tuple(input_shape), batch, str(dtype))
        if cache_key not in self._profiles:
            self._profiles[cache_key] = profile_chain(units, input_shape, batch, dtype)
        return self._profiles[cache_key]
