"""The on-device manager's segmentation: which of units ``1..cut`` to recompute.

A unit is either kept (its saved tensors add to what is held) or part of a checkpointed segment ``i+1..j``
(only the segment's input is held; while it is recomputed in backward, its own saved tensors come on top of
what the units before it hold, and that must fit too). Walking the chain left to right, a partial plan for
units ``1..i`` is summarised by the bytes it holds, whether the output of unit ``i`` is among them, and its
recompute cost. Minimising cost under a byte budget is a knapsack on a chain, so two searches share it:

- exact: dynamic programming that keeps, per state, every Pareto-optimal (bytes, cost) pair. Chains like the
  zoo's keep a few dozen; the answer is the optimum.
- bounded: for chains longer than ``PARETO_UNITS`` units, or when the exact search has weighed
  ``PARETO_WORK`` partial plans without finishing (long chains of varied units), dynamic
  programming over memory quanta, vectorised with numpy over all quanta and all segment ends. The quantum is
  the common divisor of every size when that spans at most ``MAX_LEVELS`` quanta (still exact); otherwise
  ``budget / MAX_LEVELS`` with every size rounded up, so the plan still fits and is optimal for the rounded
  sizes. ``Segmentation.exact`` says which.

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
PARETO_UNITS = 40  # longer chains go straight to the bounded search
PARETO_WORK = 20_000  # the exact search hands over to the bounded one after this many candidate plans


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

    try:
        if cut > PARETO_UNITS:
            raise _FrontierTooLarge
        segments = _pareto_search(units, cut, budget, out, seg, prefix_cost)
        exact = True
    except _FrontierTooLarge:
        segments, exact = _quantised_search(units, cut, budget, out, seg, prefix_cost)
    if segments is None:
        return None
    return Segmentation(
        segments=segments,
        recompute_flops=sum(profile.flops(a, b) for a, b in segments),
        activation_bytes=activation_bytes(profile, cut, segments),
        exact=exact,
    )


class _FrontierTooLarge(Exception):
    pass


def _pareto_search(units, cut: int, budget: int, out: list[int], seg: np.ndarray, prefix_cost: np.ndarray) -> Segments | None:
    """Exact: every partial plan summarised by (bytes held, cost); only Pareto-optimal ones survive."""
    # frontier[i][held]: (bytes held, cost, back-pointer) of plans for units 1..i
    frontier: list[dict[int, list]] = [dict() for _ in range(cut + 1)]
    frontier[0][1] = [(0, 0.0, None)]
    work = [0]
    for i in range(cut):
        u = units[i]
        for held_i, entries in frontier[i].items():
            for entry in entries:
                held, spent = entry[0], entry[1]
                keep = held + u.internal_bytes + (out[i] if u.saves_input and not held_i else 0) + (out[i + 1] if u.saves_output else 0)
                if keep <= budget:
                    _push(frontier[i + 1], int(u.saves_output), (keep, spent, (entry, 0, i)), work)
                start = held + (0 if held_i else out[i])
                for j in range(i + 1, cut + 1):
                    if start + seg[i + 1, j] > budget:
                        break
                    _push(frontier[j], 0, (start, spent + prefix_cost[j] - prefix_cost[i], (entry, i + 1, j)), work)
    finals = [e for entries in frontier[cut].values() for e in entries]
    if not finals:
        return None
    node, segments = min(finals, key=lambda e: (e[1], e[0])), []
    while node[2] is not None:
        node, first, last = node[2]
        if first:
            segments.append((first, last))
    return tuple(reversed(segments))


def _push(slot: dict[int, list], held: int, entry: tuple, work: list[int]) -> None:
    work[0] += 1
    if work[0] > PARETO_WORK:
        raise _FrontierTooLarge
    entries = slot.setdefault(held, [])
    h, c = entry[0], entry[1]
    if any(o[0] <= h and o[1] <= c for o in entries):
        return
    entries[:] = [o for o in entries if not (h <= o[0] and c <= o[1])]
    entries.append(entry)


def _quantised_search(units, cut: int, budget: int, out: list[int], seg: np.ndarray, prefix_cost: np.ndarray) -> tuple[Segments | None, bool]:
    """Bounded time: DP over memory quanta, vectorised over memory and segment ends."""
    levels, exact, internal, outq, segq = _quantise(units, cut, budget, out, seg)
    width = levels + 1

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

    return _trace_back(best[cut], cut, width, from_i, from_held, from_m, from_start), exact


def _quantise(units, cut: int, budget: int, out: list[int], seg: np.ndarray) -> tuple[int, bool, list[int], list[int], np.ndarray]:
    """The memory quantum for the bounded search: budget levels, whether the quanta are exact, and the sizes in
    quanta (rounded up) of unit internals, outputs and segment recomputations."""
    sizes = [u.internal_bytes for u in units] + out + [int(v) for v in seg[seg > 0]]
    quantum = reduce(math.gcd, [s for s in sizes if s > 0], 0) or 1
    exact = budget // quantum <= MAX_LEVELS
    if not exact:
        quantum = math.ceil(budget / MAX_LEVELS)
    q = lambda b: -(-int(b) // quantum)  # noqa: E731 - round up to quanta
    levels = budget // quantum
    internal = [q(u.internal_bytes) for u in units]
    outq = [q(b) for b in out]
    segq = np.vectorize(q)(seg) if cut else seg
    return levels, exact, internal, outq, segq


def _trace_back(
    finals: np.ndarray, cut: int, width: int, from_i: np.ndarray, from_held: np.ndarray, from_m: np.ndarray, from_start: np.ndarray
) -> Segments | None:
    """The checkpointed segments of the cheapest final state, followed back through the DP's from-tables; None
    when no state fits."""
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
    return tuple(reversed(segments))

