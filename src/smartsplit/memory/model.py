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


Segments = tuple[tuple[int, int], ...]  # checkpointed segments (first, last), 1-based, inclusive, in order


def activation_bytes(profile: ModelProfile, cut: int, segments: Segments = ()) -> int:
    """Peak bytes of saved activations for ``cut`` with ``segments`` checkpointed (see ``activation_peaks``)."""
    return max(activation_peaks(profile, cut, segments))


def activation_peaks(profile: ModelProfile, cut: int, segments: Segments = ()) -> tuple[int, ...]:
    """Bytes of saved activations held at the end of the device's forward through ``1..cut``, then while each
    checkpointed segment is recomputed in the backward.

    A unit outside every segment keeps what it saves. A checkpointed segment keeps only its input during the
    forward; in the backward it is recomputed, and while its gradient is taken it holds its own saved tensors
    on top of everything the units before it still hold. Tensors shared by neighbours (a unit's output that the
    next unit saves as its input) are counted once; the raw batch and the cut activation are counted apart.
    """
    units = profile.device_units(cut)
    in_segment = [False] * (cut + 2)
    starts = set()
    for first, last in segments:
        starts.add(first)
        for l in range(first, last + 1):
            in_segment[l] = True
    kept = [not in_segment[l] for l in range(cut + 2)]

    def boundary_held(b: int) -> bool:  # is the output of unit b held through the forward?
        if not 1 <= b < cut:
            return False
        u, nxt = units[b - 1], units[b]
        return (kept[b] and u.saves_output) or (kept[b + 1] and nxt.saves_input) or (b + 1) in starts

    held_prefix = [0] * (cut + 1)  # held_prefix[i]: held by units 1..i and boundaries 1..i
    for l in range(1, cut + 1):
        u = units[l - 1]
        held_prefix[l] = held_prefix[l - 1] + (u.internal_bytes if kept[l] else 0) + (u.output_bytes if boundary_held(l) else 0)
    peaks = [held_prefix[cut]]
    for first, last in segments:
        recompute = 0
        for l in range(first, last + 1):
            u = units[l - 1]
            recompute += u.internal_bytes
            if l < cut and (u.saves_output or (l < last and units[l].saves_input)):
                recompute += u.output_bytes
        peaks.append(held_prefix[first - 1] + recompute)
    return tuple(peaks)


def device_memory(
    profile: ModelProfile, cut: int, *, slots: int, segments: Segments = (), workspace: int = 0
) -> MemoryBreakdown:
    """Device peak for ``cut`` with ``segments`` checkpointed (none: keep every saved tensor)."""
    if not 1 <= cut <= profile.num_units:
        raise SmartSplitError(f"cut {cut} is outside 1..{profile.num_units}")
    params = profile.param_bytes(1, cut)
    activations = activation_bytes(profile, cut, segments)
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
