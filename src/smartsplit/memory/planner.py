"""The on-device manager's segmentation: which of units ``1..cut`` to recompute (DESIGN 3).

Dynamic programming over the chain and over memory. ``best[i, held, m]`` is the least recompute cost of a
plan for units ``1..i`` that holds exactly ``m`` memory quanta, ``held`` saying whether the output of unit
``i`` is among them. A unit is either kept (its saved tensors add to what is held) or part of a checkpointed
segment ``i+1..j`` (only the segment's input is held; while it is recomputed in backward, its own saved
tensors come on top of what the units before it hold, and that must fit too). Every transition out of one
state is a single numpy operation over all ``m`` and all segment ends ``j``.

Memory is counted in quanta: the largest common divisor of every size when the budget spans at most
``MAX_LEVELS`` of them, which makes the plan exactly optimal; otherwise ``budget / MAX_LEVELS``, every size
rounded up, so the plan still fits and is optimal for the rounded sizes (``Segmentation.exact`` says which).
``activation_bytes`` in ``memory.model`` is the reference every plan is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Callable

import numpy as np

from smartsplit.memory.model import Segments, activation_bytes
from smartsplit.models.profile import ModelProfile

MAX_LEVELS = 1024


@dataclass(frozen=True)
class Segmentation:
    segments: Segments  # checkpointed segments, (first, last) 1-based inclusive
    recompute_flops: int  # extra forward FLOPs per micro-batch
    activation_bytes: int  # predicted peak of saved activations
    exact: bool  # optimal for the exact sizes (else for sizes rounded up to the quantum)


def plan_segments(profile: ModelProfile, cut: int, budget: int, cost: Callable[[int], float] | None = None) -> Segmentation | None:
    """Segmentation of units ``1..cut`` with the least recompute whose activation peak is at most ``budget``.

    ``cost(l)`` is the recompute cost of unit ``l`` (default: its forward FLOPs; measured unit times work too).
    Returns None when even the best plan does not fit.
    """
    if budget < 0:
        return None
    units = profile.device_units(cut)
    if activation_bytes(profile, cut) <= budget:
        return Segmentation((), 0, activation_bytes(profile, cut), True)
    cost = cost or (lambda l: units[l - 1].flops)
    unit_cost = np.array([0.0] + [float(cost(l)) for l in range(1, cut + 1)])
    prefix_cost = np.cumsum(unit_cost)
    out = [0] + [u.output_bytes if i < cut else 0 for i, u in enumerate(units, start=1)]  # the cut tensor is apart

    # seg[i][j]: bytes segment i..j holds while recomputed, on top of its input
    seg = np.zeros((cut + 2, cut + 1), dtype=np.int64)
    for i in range(1, cut + 1):
        total = 0
        for j in range(i, cut + 1):
            u = units[j - 1]
            total += u.internal_bytes
            if j > i and (units[j - 2].saves_output or u.saves_input):
                total += out[j - 1]
            seg[i, j] = total + (out[j] if u.saves_output else 0)

    sizes = [u.internal_bytes for u in units] + out + [int(v) for v in seg[seg > 0]]
    quantum = reduce(math.gcd, [s for s in sizes if s > 0], 0) or 1
    exact = budget // quantum <= MAX_LEVELS
    if not exact:
        quantum = math.ceil(budget / MAX_LEVELS)
    q = lambda b: -(-int(b) // quantum)  # noqa: E731 - round up to quanta
    levels = budget // quantum
    width = levels + 1
    internal = [q(u.internal_bytes) for u in units]
    outq = [q(b) for b in out]
    segq = np.vectorize(q)(seg) if cut else seg

    inf = np.inf
    best = np.full((cut + 1, 2, width), inf)
    # where each state came from: previous i, previous held, previous m, segment start (0: a kept unit)
    from_i, from_held, from_m, from_start = (np.full((cut + 1, 2, width), -1, dtype=np.int64) for _ in range(4))
    best[0, 1, 0] = 0.0  # the raw batch is counted apart: boundary 0 is "held"
    m_index = np.arange(width)

    def relax(rows: slice, held: int, cand: np.ndarray, i: int, held_i: int, shift: int, start: int) -> None:
        view = best[rows, held]
        better = cand < view
        if not better.any():
            return
        view[better] = cand[better]
        from_i[rows, held][better] = i
        from_held[rows, held][better] = held_i
        from_m[rows, held][better] = np.broadcast_to(m_index - shift, cand.shape)[better]
        from_start[rows, held][better] = start

    for i in range(cut):
        for held_i in (0, 1):
            src = best[i, held_i]
            if not np.isfinite(src).any():
                continue
            u = units[i]
            # keep unit i+1
            add = internal[i] + (outq[i] if u.saves_input and not held_i else 0) + (outq[i + 1] if u.saves_output else 0)
            if add <= levels:
                cand = np.full((1, width), inf)
                cand[0, add:] = src[: width - add]
                relax(slice(i + 1, i + 2), int(u.saves_output), cand, i, held_i, add, 0)
            # checkpoint units i+1..j for every j at once; segments only grow with j, so the ends that fit
            # at all are a prefix
            shift = 0 if held_i else outq[i]
            room = levels - shift - segq[i + 1, i + 1 : cut + 1]
            last = i + int(np.count_nonzero(np.maximum.accumulate(room < 0) == 0))
            if last <= i:
                continue
            ends = np.arange(i + 1, last + 1)
            cand = np.full((len(ends), width), inf)
            cand[:, shift:] = src[None, : width - shift] + (prefix_cost[ends] - prefix_cost[i])[:, None]
            cand[(m_index[None, :] - shift) > room[: len(ends), None]] = inf
            relax(slice(i + 1, last + 1), 0, cand, i, held_i, shift, i + 1)

    finals = best[cut]
    flat = int(np.argmin(finals))
    held_f, m_f = divmod(flat, width)
    if not np.isfinite(finals[held_f, m_f]):
        return None
    segments = []
    i, h, m = cut, held_f, m_f
    while i > 0:
        pi, ph, pm, start = from_i[i, h, m], from_held[i, h, m], from_m[i, h, m], from_start[i, h, m]
        if start > 0:
            segments.append((int(start), int(i)))
        i, h, m = int(pi), int(ph), int(pm)
    segments = tuple(reversed(segments))
    return Segmentation(
        segments=segments,
        recompute_flops=sum(profile.flops(a, b) for a, b in segments),
        activation_bytes=activation_bytes(profile, cut, segments),
        exact=exact,
    )

