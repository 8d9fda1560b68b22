"""Predicted device peak memory for a cut (DESIGN 3)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from smartsplit.errors import SmartSplitError
from smartsplit.models.profile import ModelProfile


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes the device holds at its peak, by kind."""

    weights: int
    grads: int
    optimizer: int
    input: int
    activations: int
    cut_io: int  # the cut activation and the gradient returned for it
    in_flight: int  # gradients alive together during backward (the largest adjacent pair)
    workspace: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def optimizer_slots(name: str, momentum: float = 0.0) -> int:
    """Tensors of optimizer state kept per parameter."""
    if name == "sgd":
        return 1 if momentum > 0 else 0
    if name == "adam":
        return 2
    raise SmartSplitError(f"training.optimizer: unknown optimizer {name!r}; use 'sgd' or 'adam'")


def in_flight_bytes(profile: ModelProfile, cut: int) -> int:
    """Largest set of gradients alive at once while the device backpropagates through ``1..cut``.

    The gradient returned for the cut is counted in ``cut_io``; below it, backward through unit ``l``
    holds the gradient of its output and produces the gradient of its input (none for the raw batch).
    """
    outputs = [0] + [u.output_bytes for u in profile.device_units(cut)]  # outputs[0]: the batch, needs no grad
    pairs = [outputs[cut - 1]] + [outputs[l] + outputs[l - 1] for l in range(1, cut)]
    return max(pairs)


def device_memory(profile: ModelProfile, cut: int, *, slots: int, activations: int | None = None, workspace: int = 0) -> MemoryBreakdown:
    """Device peak for ``cut``; ``activations`` defaults to keeping every saved tensor (no recompute)."""
    if not 1 <= cut <= profile.num_units:
        raise SmartSplitError(f"cut {cut} is outside 1..{profile.num_units}")
    params = profile.param_bytes(1, cut)
    if activations is None:
        activations = sum(u.saved_bytes for u in profile.device_units(cut))
    return MemoryBreakdown(
        weights=params,
        grads=params,
        optimizer=slots * params,
        input=profile.input_bytes,
        activations=activations,
        cut_io=2 * profile.unit(cut).output_bytes,
        in_flight=in_flight_bytes(profile, cut),
        workspace=workspace,
    )
