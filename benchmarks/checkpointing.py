"""Recompute overhead of the optimal checkpoint plan against checkpoint_sequential and the sqrt(L) rule.

For a few zoo models and cuts, at budgets that are fractions of the no-recompute activation bytes, three
segmentations of the device's units ``1..cut`` are judged by the same memory evaluator (``activation_peaks``,
the peak of saved activations in the forward and while each checkpointed segment is recomputed):

  dp     ``plan_segments``: the optimal dynamic programme (least recompute FLOPs that fit).
  seq    torch's ``checkpoint_sequential(units, k)``: ``k`` chunks of ``cut // k`` units, every chunk
         checkpointed but the last, which runs to the end un-checkpointed (as torch does); the smallest ``k``
         in ``1..cut`` whose plan fits.
  sqrt   the sqrt(L) rule (Chen et al. 2016, "sublinear memory cost"): ``k = round(sqrt(cut))`` segments of
         near-equal length (sizes differ by at most one), all checkpointed but the last; one fixed plan, blind
         to the budget.

Overhead = extra forward FLOPs recomputed / the step's forward + backward FLOPs of units ``1..cut``
(backward = 2 x forward, as the profiles assume). FLOPs come from the measured profiles
(``FlopCounterMode``). "does not fit" where a method cannot meet the budget. Then ``plan_segments`` is
timed on synthetic 100-unit chains (random ``UnitProfile``s).

Run: ``.venv/bin/python benchmarks/checkpointing.py [--quick] [--batch 32]``. Where it measures: this
benchmark is arithmetic on profiles measured on the CPU; the timing is of the planner on this machine's CPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

from smartsplit.memory.model import activation_bytes
from smartsplit.memory.planner import plan_segments
from smartsplit.models.profile import BACKWARD_FLOPS, ModelProfile, UnitProfile, profile_chain
from smartsplit.models.zoo import build_model, default_input_shape

MB = 2**20


def sequential_segments(n: int, k: int) -> tuple[tuple[int, int], ...]:
    """The checkpointed segments of ``checkpoint_sequential`` over ``n`` units with ``k`` segments (1-based)."""
    size = n // k
    if k <= 1 or size == 0:
        return ()
    return tuple((i * size + 1, (i + 1) * size) for i in range(k - 1))


def sqrt_segments(n: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """``round(sqrt(n))`` near-equal segments; all checkpointed but the last."""
    k = max(1, round(math.sqrt(n)))
    bounds = np.array_split(np.arange(1, n + 1), k)
    segs = tuple((int(b[0]), int(b[-1])) for b in bounds[:-1] if len(b))
    return k, segs


def recompute_flops(profile: ModelProfile, segments) -> int:
    return sum(profile.flops(a, b) for a, b in segments)


def overhead(profile: ModelProfile, cut: int, segments) -> float:
    return 100.0 * recompute_flops(profile, segments) / ((1 + BACKWARD_FLOPS) * profile.flops(1, cut))


def fmt_segs(segments) -> str:
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in segments) or "-"


def all_segmentations(n: int, first: int = 1):
    """Every segmentation of units ``first..n``: each unit kept, or inside one checkpointed segment."""
    if first > n:
        yield ()
        return
    for rest in all_segmentations(n, first + 1):  # unit ``first`` kept
        yield rest
    for last in range(first, n + 1):  # a segment first..last
        for rest in all_segmentations(n, last + 1):
            yield ((first, last), *rest)


def brute_force(profile: ModelProfile, cut: int, budget: int) -> int | None:
    """Least recompute FLOPs over every segmentation that fits (None: none fits)."""
    best = None
    for segments in all_segmentations(cut):
        cost = recompute_flops(profile, segments)
        if (best is None or cost < best) and activation_bytes(profile, cut, segments) <= budget:
            best = cost
    return best


def random_chain(rng: np.random.Generator, n: int) -> ModelProfile:
    """A synthetic chain with unit sizes and costs spread over an order of magnitude or more."""
    units = []
    prev = int(rng.integers(100_000, 5_000_000))
    for i in range(1, n + 1):
        out = int(rng.integers(100_000, 5_000_000))
        units.append(
            UnitProfile(
                index=i, name=f"u{i}", param_bytes=int(rng.integers(0, 1_000_000)),
                internal_bytes=int(rng.integers(0, 8_000_000)), saves_input=bool(rng.random() < 0.8),
                saves_output=bool(rng.random() < 0.4), output_bytes=out, flops=int(rng.integers(1_000_000, 1_000_000_000)),
                input_bytes=prev,
            )
        )
        prev = out
    return ModelProfile(input_shape=(1,), batch=1, dtype="float32", input_bytes=prev, units=tuple(units))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budgets", default="0.7,0.5,0.35", help="fractions of the no-recompute activation bytes")
    ap.add_argument("--quick", action="store_true", help="batch 8, fewer model/cut cases, fewer timing runs")
    ap.add_argument("--timing-chains", type=int, default=10, help="synthetic 100-unit chains to time plan_segments on")
    ap.add_argument("--units", type=int, default=100, help="units of the synthetic chain")
    ap.add_argument("--brute-force-max", type=int, default=10, help="check dp against every segmentation when cut <= this")
    args = ap.parse_args(argv)
    batch = 8 if args.quick else args.batch
    fractions = [float(f) for f in args.budgets.split(",")]
    cases = [("vgg16", None), ("vgg16", 7), ("resnet18", None), ("mobilenetv2", None), ("mobilenetv2", 10), ("vgg11", None)]
    if args.quick:
        cases = [("vgg16", None), ("resnet18", None), ("mobilenetv2", None)]

    print("memory evaluator: activation_peaks (forward-held and recompute peaks); FLOPs: FlopCounterMode profiles, "
          f"batch {batch}; overhead = recomputed FLOPs / (forward + {BACKWARD_FLOPS} x forward) of units 1..cut")
    print("seq = checkpoint_sequential(k): chunks of cut//k units, all but the last checkpointed, smallest k that fits")
    print("sqrt = round(sqrt(cut)) near-equal segments, all but the last checkpointed (fixed plan)")
    print()
    head = (f"{'model':<12}{'cut':>4}{'budget':>7}{'MB':>8} | {'dp overhead':>11} {'peak MB':>8}  {'dp segments':<22}| "
            f"{'seq k':>5} {'overhead':>9} {'peak MB':>8} | {'sqrt k':>6} {'overhead':>9} {'peak MB':>8}  | "
            f"{'dp quanta':<9} brute force (cut <= {args.brute_force_max})")
    print(head)
    print("-" * len(head))
    dp_never_worse = True
    gains = []
    bf_same = bf_differs = 0
    for name, cut_arg in cases:
        model = build_model(name)
        profile = profile_chain(model, default_input_shape(name), batch)
        L = profile.num_units
        cut = cut_arg or L
        full = activation_bytes(profile, cut)
        k_sqrt, segs_sqrt = sqrt_segments(cut)
        for frac in fractions:
            budget = int(full * frac)
            dp = plan_segments(profile, cut, budget)
            dp_txt = (f"{overhead(profile, cut, dp.segments):>10.2f}% {dp.activation_bytes / MB:>8.2f}  {fmt_segs(dp.segments):<22}"
                      if dp else f"{'does not fit':>11} {'':>8}  {'':<22}")
            if cut <= args.brute_force_max:
                bf = brute_force(profile, cut, budget)
                dp_cost = recompute_flops(profile, dp.segments) if dp else None
                if bf == dp_cost:
                    bf_txt = "= optimum"
                    bf_same += 1
                else:
                    bf_txt = "optimum " + ("does not fit" if bf is None else f"{100 * bf / ((1 + BACKWARD_FLOPS) * profile.flops(1, cut)):.2f}%")
                    bf_differs += 1
            else:
                bf_txt = "(cut too long to enumerate)"
            exact_txt = "exact" if getattr(dp, "exact", True) else "rounded"
            seq_k = next((k for k in range(1, cut + 1) if activation_bytes(profile, cut, sequential_segments(cut, k)) <= budget), None)
            if seq_k is None:
                seq_txt = f"{'-':>5} {'does not fit':>9} {'':>8}"
            else:
                s = sequential_segments(cut, seq_k)
                seq_txt = f"{seq_k:>5} {overhead(profile, cut, s):>8.2f}% {activation_bytes(profile, cut, s) / MB:>8.2f}"
            sqrt_peak = activation_bytes(profile, cut, segs_sqrt)
            sqrt_fits = sqrt_peak <= budget
            sqrt_txt = (f"{k_sqrt:>6} {overhead(profile, cut, segs_sqrt):>8.2f}% {sqrt_peak / MB:>8.2f}" if sqrt_fits
                        else f"{k_sqrt:>6} {'does not fit':>9} ({sqrt_peak / MB:.2f})")
            print(f"{name:<12}{cut:>4}{frac:>7.2f}{budget / MB:>8.2f} | {dp_txt}| {seq_txt} | {sqrt_txt:<24} | "
                  f"{exact_txt if dp else '':<8}{bf_txt}")
            # sanity: the optimum is never worse than a fitting alternative
            dp_cost = recompute_flops(profile, dp.segments) if dp else None
            for alt_fits, alt_segs in ((seq_k is not None, sequential_segments(cut, seq_k or 1)), (sqrt_fits, segs_sqrt)):
                if alt_fits:
                    alt_cost = recompute_flops(profile, alt_segs)
                    if dp_cost is None or dp_cost > alt_cost:
                        dp_never_worse = False
                    elif alt_cost:
                        gains.append(1 - dp_cost / alt_cost)
    print()
    print(f"dp never worse than a fitting alternative: {'yes' if dp_never_worse else 'NO'}")
    if bf_same + bf_differs:
        print(f"dp equals the brute-force optimum in {bf_same} of {bf_same + bf_differs} cases with cut <= {args.brute_force_max}")
    if gains:
        print(f"dp recompute saved against fitting alternatives: mean {100 * statistics.mean(gains):.1f}%, "
              f"max {100 * max(gains):.1f}% (n={len(gains)})")

    # ---- planner speed on a synthetic chain -----------------------------------------------------------
    rng = np.random.default_rng(0)
    chains = 3 if args.quick else args.timing_chains
    n = args.units
    times, fitted, rounded = [], 0, 0
    for _ in range(chains):
        chain = random_chain(rng, n)
        full = activation_bytes(chain, n)
        for frac in fractions:
            t0 = time.perf_counter()
            plan = plan_segments(chain, n, int(full * frac))
            times.append(time.perf_counter() - t0)
            fitted += plan is not None
            rounded += plan is not None and not getattr(plan, "exact", True)
    ms = [1e3 * t for t in times]
    print()
    print(f"plan_segments on synthetic {n}-unit chains: {len(ms)} plans ({chains} chains x budgets {args.budgets}), "
          f"{fitted} fitted, {rounded} of them planned on rounded memory quanta")
    print(f"plan_segments time: mean {statistics.mean(ms):.1f} ms, median {statistics.median(ms):.1f} ms, "
          f"max {max(ms):.1f} ms (target < 50 ms: {'met' if statistics.mean(ms) < 50 else 'NOT met'})")
    return 0 if dp_never_worse else 1


if __name__ == "__main__":
    sys.exit(main())
