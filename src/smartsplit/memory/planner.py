"""The on-device manager's plan: micro-batch size and the optimal checkpoint segmentation (DESIGN 3).

For one micro-batch size the segmentation problem is exact dynamic programming over the chain: walking the
units left to right, every partial plan is summarised by the bytes it holds and the FLOPs it will recompute;
only Pareto-optimal pairs survive. A checkpointed segment must fit while it is recomputed, on top of what the
units before it hold; the finished plan must fit its forward. ``activation_bytes`` is the reference the plan
is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from smartsplit.memory.model import Segments
from smartsplit.models.profile import ModelProfile


@dataclass(frozen=True)
class Segmentation:
    segments: Segments  # checkpointed segments, (first, last) 1-based inclusive
    recompute_flops: int  # extra forward FLOPs per micro-batch
    activation_bytes: int  # predicted peak of saved activations


def plan_segments(profile: ModelProfile, cut: int, budget: int, cost: Callable[[int], float] | None = None) -> Segmentation | None:
    """Segmentation of units ``1..cut`` with the least recompute whose activation peak is at most ``budget``.

    ``cost(l)`` is the recompute cost of unit ``l`` (default: its forward FLOPs; measured unit times work too).
    Returns None when even checkpointing everything does not fit.
    """
    units = profile.device_units(cut)
    cost = cost or (lambda l: units[l - 1].flops)
    out = [0] + [u.output_bytes if i < cut else 0 for i, u in enumerate(units, start=1)]  # boundary cut is counted apart

    # recompute[i][j]: bytes segment i..j holds while it is recomputed (its input is held already)
    seg_bytes = {}
    for i in range(1, cut + 1):
        total = 0
        for j in range(i, cut + 1):
            u = units[j - 1]
            total += u.internal_bytes
            # boundary j-1 (inside the segment) is saved during recompute if unit j-1 saves its output or j its input
            if j > i and (units[j - 2].saves_output or u.saves_input):
                total += out[j - 1]
            seg_bytes[i, j] = total + (out[j] if u.saves_output else 0)

    # frontier[i][held]: list of (held bytes, cost, back-pointer) for plans of units 1..i;
    # held = whether boundary i is already counted in the held bytes
    frontier: list[dict[bool, list]] = [dict() for _ in range(cut + 1)]
    frontier[0][True] = [(0, 0.0, None)]  # the raw batch is counted apart, so boundary 0 is "held"
    for i in range(cut):
        for held_i, entries in frontier[i].items():
            for entry in entries:
                held, spent, _ = entry
                # keep unit i+1
                u = units[i]
                h = held + u.internal_bytes + (out[i] if u.saves_input and not held_i else 0) + (out[i + 1] if u.saves_output else 0)
                if h <= budget:
                    _push(frontier[i + 1], u.saves_output, (h, spent, (entry, i, held_i, None)))
                # checkpoint units i+1..j
                start = held + (0 if held_i else out[i])
                extra = 0.0
                for j in range(i + 1, cut + 1):
                    extra += cost(j)
                    if start + seg_bytes[i + 1, j] > budget:
                        break
                    _push(frontier[j], False, (start, spent + extra, (entry, i, held_i, j)))
    finals = [e for entries in frontier[cut].values() for e in entries if e[0] <= budget]
    if not finals:
        return None
    best = min(finals, key=lambda e: (e[1], e[0]))
    segments = []
    node = best
    while node[2] is not None:
        parent, i, _, j = node[2]
        if j is not None:
            segments.append((i + 1, j))
        node = parent
    segments.reverse()
    from smartsplit.memory.model import activation_bytes

    return Segmentation(
        segments=tuple(segments),
        recompute_flops=sum(profile.flops(a, b) for a, b in segments),
        activation_bytes=activation_bytes(profile, cut, tuple(segments)),
    )


def _push(slot: dict[bool, list], held: bool, entry: tuple) -> None:
    """Add ``entry`` to the Pareto set (fewer held bytes, less cost) of ``slot[held]``."""
    entries = slot.setdefault(held, [])
    h, c = entry[0], entry[1]
    for other in entries:
        if other[0] <= h and other[1] <= c:
            return
    entries[:] = [o for o in entries if not (h <= o[0] and c <= o[1])]
    entries.append(entry)
