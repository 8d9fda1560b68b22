"""Predicted device peak memory for a cut, a micro-batch size and a checkpoint plan: an upper bound of what the
meter measures (``meter``), built from per-unit figures the meter measured once."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from smartsplit.errors import SmartSplitError
from smartsplit.meter.heap import UnitCost
from smartsplit.models.profile import ModelProfile, UnitProfile


MARGIN_FRACTION = 0.02  # the prediction's allowance over the composed figure, relative ...
MARGIN_BYTES = 4096  # ... and absolute (a step allocates some small Python and autograd objects of its own)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes the device holds at the moment of its predicted peak, by kind."""

    static: int  # weights, optimizer state, and the gradients that exist at that moment
    input: int  # the micro-batch
    activations: int  # saved for backward (and autograd's graph), held by the units below the moment
    cut_io: int  # the cut activation and the gradient returned for it
    transient: int  # what the unit running at that moment needs on top: output, scratch, gradients in flight
    margin: int = 0  # for what the meter's per-unit figures cannot see (allocator rounding, Python objects)
    phase: str = ""  # where the peak is: "forward 3", "recompute 2", "backward 1", "optimizer", "link"

    @property
    def total(self) -> int:
        return self.static + self.input + self.activations + self.cut_io + self.transient + self.margin


def optimizer_slots(name: str, momentum: float = 0.0) -> int:
    """Tensors of optimizer state kept per parameter."""
    if name == "sgd":
        return 1 if momentum > 0 else 0
    if name == "adam":
        return 2
    raise SmartSplitError(f"training.optimizer: unknown optimizer {name!r}; use 'sgd' or 'adam'")


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
    held_prefix = _held_prefix(profile, cut, segments)
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


def device_memory(profile: ModelProfile, cut: int, *, slots: int, segments: Segments = (), micro_batches: int = 1) -> MemoryBreakdown:
    """Predicted device peak of one step at ``cut`` with ``segments`` checkpointed, ``micro_batches`` of
    ``profile.batch`` examples each (gradients accumulate across them).

    The step is walked moment by moment: each unit's forward (and each checkpointed segment's recomputation)
    on top of what the units before it hold, the cut tensors on the link, each unit's backward on top of what
    the units below it still hold, the optimizer step. The peak is the largest moment, so nothing is counted
    that is never alive at once. What a unit needs while it runs (its output, scratch, the gradients it makes)
    comes from the meter's per-unit figures (``UnitProfile.cost``); a profile without them falls back to its
    saved-tensor figures, which leave out scratch and are no bound.
    """
    if not 1 <= cut <= profile.num_units:
        raise SmartSplitError(f"cut {cut} is outside 1..{profile.num_units}")
    step = _step_figures(profile, cut, segments, slots)
    moments: list[MemoryBreakdown] = []
    # The first micro-batch's backward allocates each unit's gradients; from the second on they all exist and
    # each unit's backward adds to them.
    for first in (True, False) if micro_batches > 1 else (True,):
        when = "" if micro_batches == 1 else (", first micro-batch" if first else ", later micro-batches")
        _pass_moments(step, cut, segments, first, when, moments)
    optimizer_peak = max(c.optimizer_peak for c in step.costs)
    moments.append(MemoryBreakdown(step.fixed + sum(step.grads), 0, 0, 0, optimizer_peak, phase="optimizer"))
    peak = max(moments, key=lambda m: m.total)
    return replace(peak, margin=int(MARGIN_FRACTION * peak.total) + MARGIN_BYTES)


class _StepFigures(NamedTuple):
    """What every moment of ``device_memory``'s walk reads: the device units' costs and what is held where."""

    units: list[UnitProfile]
    costs: list[UnitCost]
    grads: list[int]  # each unit's gradients
    fixed: int  # weights and optimizer state
    node_prefix: list[int]  # graph bytes held by units 1..i beyond their saved tensors
    held: list[int]  # ``_held_prefix`` with the segments checkpointed ...
    full: list[int]  # ... and with none
    out: list[int]  # out[i]: the output of unit i (out[0]: the raw batch)
    kept_boundary: list[bool]  # ``_boundaries_held`` with the segments checkpointed ...
    full_boundary: list[bool]  # ... and with none
    cut_io: int  # the cut activation and the gradient returned for it
    segment_of: dict[int, tuple[int, int]]  # the segment each checkpointed unit is in
    regraph: dict[tuple[int, int], int]  # graph bytes each segment's recomputation builds again


def _step_figures(profile: ModelProfile, cut: int, segments: Segments, slots: int) -> _StepFigures:
    """The per-unit figures and held-bytes prefixes of one step at ``cut`` that ``device_memory`` walks."""
    units = profile.device_units(cut)
    costs = [_cost(u, slots, first=(l == 1)) for l, u in enumerate(units, start=1)]
    grads = [c.grads for c in costs]
    fixed = sum(c.static - c.grads for c in costs)  # weights and optimizer state
    nodes = [max(0, c.forward_kept - u.output_bytes - u.internal_bytes) for u, c in zip(units, costs)]
    for first, _ in segments:  # a checkpoint's own bookkeeping, held until its segment's backward
        nodes[first - 1] += max(0, costs[first - 1].checkpoint_kept - units[first - 1].output_bytes)
    node_prefix = [0]
    for n in nodes:
        node_prefix.append(node_prefix[-1] + n)
    held = _held_prefix(profile, cut, segments)
    full = _held_prefix(profile, cut, ())
    out = [profile.input_bytes] + [u.output_bytes for u in units]
    kept_boundary = _boundaries_held(profile, cut, segments)
    full_boundary = _boundaries_held(profile, cut, ())
    cut_io = 2 * out[cut]
    segment_of = {l: (a, b) for a, b in segments for l in range(a, b + 1)}
    # recomputing a segment builds its graph again, with the checkpoint's bookkeeping, until its backward ends
    regraph = {(a, b): sum(nodes[a - 1 : b]) for a, b in segments}
    return _StepFigures(
        units, costs, grads, fixed, node_prefix, held, full, out, kept_boundary, full_boundary, cut_io, segment_of, regraph
    )


def _pass_moments(
    step: _StepFigures, cut: int, segments: Segments, first: bool, when: str, moments: list[MemoryBreakdown]
) -> None:
    """Appends to ``moments`` those of one micro-batch's forward, link, recomputations and backward (``first``:
    the first micro-batch, whose backward allocates the gradients)."""
    units, costs, grads, fixed, node_prefix, held, full, out, kept_boundary, full_boundary, cut_io, segment_of, regraph = step

    def moment(phase: str, static: int, activations: int, transient: int, io: int = 0) -> None:
        moments.append(MemoryBreakdown(static, out[0], activations, io, transient, phase=phase))

    def grads_while(l: int) -> int:  # gradients that exist while unit l runs backward
        return sum(grads[l:]) if first else sum(grads)

    def backward(l: int) -> int:
        c = costs[l - 1]
        if l == cut:
            return c.backward_first_at_cut if first else c.backward_accumulating_at_cut
        return c.backward_first if first else c.backward_accumulating

    forward_static = fixed + (0 if first else sum(grads))
    for l in range(1, cut + 1):
        current = out[l - 1] if l > 1 and not kept_boundary[l - 1] else 0  # its input, if nothing else holds it
        moment(f"forward {l}{when}", forward_static, held[l - 1] + node_prefix[l - 1] + current, costs[l - 1].forward_peak)
    moment(f"link{when}", forward_static, held[cut] + node_prefix[cut], 0, cut_io)
    for a, b in segments:  # recomputation, when backward reaches the segment: the units above it are done
        for j in range(a, b + 1):
            below = held[a - 1] + full[j - 1] - full[a - 1] + node_prefix[j - 1] + regraph[a, b]
            current = out[j - 1] if j > a and not full_boundary[j - 1] else 0
            in_flight = out[b] if b < cut else 0
            moment(f"recompute {j}{when}", fixed + grads_while(b), below + current, costs[j - 1].forward_peak + in_flight, cut_io)
    for l in range(cut, 0, -1):
        a, b = segment_of.get(l, (l, l))
        below = held[a - 1] + full[l - 1] - full[a - 1] + node_prefix[l] + regraph.get((a, b), 0)
        own = units[l - 1].internal_bytes + (out[l] if units[l - 1].saves_output and l < cut else 0)
        # below the cut, the unit's figure includes the gradient of its output, made just before it runs
        moment(f"backward {l}{when}", fixed + grads_while(l), below + own, backward(l), cut_io)


def _held_prefix(profile: ModelProfile, cut: int, segments: Segments) -> list[int]:
    """held[i]: saved bytes held by units 1..i and boundaries 1..i at the end of the forward."""
    units = profile.device_units(cut)
    kept = _kept(cut, segments)
    boundary = _boundaries_held(profile, cut, segments)
    held = [0] * (cut + 1)
    for l in range(1, cut + 1):
        held[l] = held[l - 1] + (units[l - 1].internal_bytes if kept[l] else 0) + (units[l - 1].output_bytes if boundary[l] else 0)
    return held


def _kept(cut: int, segments: Segments) -> list[bool]:
    kept = [True] * (cut + 2)
    for first, last in segments:
        for l in range(first, last + 1):
            kept[l] = False
    return kept


def _boundaries_held(profile: ModelProfile, cut: int, segments: Segments) -> list[bool]:
    """held[b]: the output of unit b (1 <= b < cut) is held through the forward (by b, by b + 1, or as a
    checkpointed segment's input)."""
    units = profile.device_units(cut)
    kept = _kept(cut, segments)
    starts = {first for first, _ in segments}
    held = [False] * (cut + 1)
    for b in range(1, cut):
        held[b] = (kept[b] and units[b - 1].saves_output) or (kept[b + 1] and units[b].saves_input) or (b + 1) in starts
    return held


def _cost(unit: UnitProfile, slots: int, first: bool) -> UnitCost:
    """The meter's figures for ``unit``, or, for a profile made without the meter, saved-tensor estimates."""
    if unit.cost is not None:
        return unit.cost
    own = unit.output_bytes + unit.internal_bytes
    return UnitCost(
        static=(2 + slots) * unit.param_bytes,
        grads=unit.param_bytes,
        forward_peak=own,
        forward_kept=own,
        backward_first=unit.output_bytes + unit.param_bytes + (0 if first else unit.input_bytes),
        backward_accumulating=unit.output_bytes + unit.param_bytes + (0 if first else unit.input_bytes),
        backward_first_at_cut=unit.param_bytes + (0 if first else unit.input_bytes),
        backward_accumulating_at_cut=unit.param_bytes + (0 if first else unit.input_bytes),
        checkpoint_kept=unit.output_bytes,
        optimizer_peak=0,
    )
