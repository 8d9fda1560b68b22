"""Layer-wise aggregation across heterogeneous cuts."""

from __future__ import annotations

import torch
from torch import nn

from smartsplit.messages import Update


def merge(updates: list[Update]) -> Update:
    """One update standing for several: per unit, the sample-weighted mean of the copies holding it.

    This is one level of the hierarchy (an edge server merging its devices and its own copy); a unit's
    samples add up, so merging merged updates weighs every sample alike.
    """
    units: dict[int, dict[str, torch.Tensor]] = {}
    samples: dict[int, int] = {}
    for index in sorted({i for c in updates for i in c.samples}):
        holders = [(c.units[index], c.samples[index]) for c in updates if c.samples.get(index, 0) > 0]
        if not holders:
            continue
        total = sum(n for _, n in holders)
        merged = {}
        for key, value in holders[0][0].items():
            if value.is_floating_point():
                merged[key] = sum(state[key].to(torch.float64) * (n / total) for state, n in holders).to(value.dtype)
            else:  # integer buffers (counters): take the most-trained copy's
                merged[key] = max(holders, key=lambda h: h[1])[0][key].clone()
        units[index], samples[index] = merged, total
    return Update(units=units, samples=samples)


def aggregate(global_units: nn.Sequential, updates: list[Update]) -> None:
    """Replace each unit of ``global_units`` by the sample-weighted mean of the copies that trained it.

    Unit ``l`` averages the device copies (devices with cut >= l) and the edge copies (weighted by the samples
    of the devices whose cut is below l). A unit nobody trained keeps its weights. With every cut at L this is
    exactly FedAvg. For a hierarchy, pass one ``merge`` per edge server.
    """
    merged = merge(updates)
    for index, state in merged.units.items():
        global_units[index - 1].load_state_dict(state)


def unit_state(unit: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of one unit's state dict (what a message carries)."""
    return {k: v.detach().clone() for k, v in unit.state_dict().items()}


def unit_states(units: nn.Sequential, first: int, last: int) -> dict[int, dict[str, torch.Tensor]]:
    """Detached copies of the state dicts of units ``first..last`` (1-based) of a chain."""
    return {i: unit_state(units[i - 1]) for i in range(first, last + 1)}


def all_finite(update: Update) -> bool:
    """No NaN or infinity in any floating-point tensor of ``update`` (a diverging copy holds some)."""
    return all(bool(torch.isfinite(v).all()) for state in update.units.values() for v in state.values()
               if v.is_floating_point())
