"""Headline: how much less device memory SmartSplit needs than training the whole model on the device.

At batch 32 on 32x32x3 inputs, for vgg16, resnet18 and mobilenetv2:
  (a) the meter's peak of training the whole model on the device (cut = L, whole batch, nothing recomputed);
  budget = (a) / 100;
  the on-device manager (``OnDeviceManager.deepest_fitting_cut``) picks the deepest cut and the plan
  (micro-batch, checkpointed segments) whose predicted peak fits that budget;
  (b) the meter's peak of one device step under that plan.
Every figure in (a) and (b) comes from the memory meter (``smartsplit.meter.heap``: a malloc counter
preloaded into a child process, oneDNN on), none from the memory model. The run fails if (b) exceeds the budget.
Printed besides: the plan's recompute overhead in FLOPs (extra forward FLOPs over the step's forward + backward
FLOPs at that cut) and in wall time (the device side of a real step under the plan against the whole-batch,
nothing-recomputed step at the same cut, on this machine's CPU, the edge replaced by a stub).

The last line is ``min_ratio=<value>``: the smallest (a)/(b) over the models.

Run: ``.venv/bin/python benchmarks/device_memory.py [--models vgg16,resnet18] [--divisor 100] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from smartsplit.engine.step import split_step
from smartsplit.memory.ondevice import OnDeviceManager
from smartsplit.meter.heap import HeapMeter
from smartsplit.models.profile import BACKWARD_FLOPS, ProfileCache
from smartsplit.models.zoo import build_model, default_input_shape

MB = 2**20
OPTIMIZER = ("sgd", 0.01, 0.9)
SLOTS = 1


def fmt_plan(plan) -> str:
    segs = ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in plan.segments) or "none"
    return f"cut {plan.cut}, micro-batch {plan.micro_batch} ({plan.round_trips} round trips), checkpointed {segs}"


class _StubHead(nn.Module):
    """Stands in for the edge when timing the device side: ten of the activation's features as logits."""

    def forward(self, received: torch.Tensor) -> torch.Tensor:
        return received.flatten(1)[:, :10]


def device_seconds(model: nn.Sequential, cut: int, x, y, *, micro_batch=None, segments=(), steps=3) -> float:
    """Fastest wall time, after one warm-up step, of the device's part of a step (edge stubbed)."""
    units = copy.deepcopy(model[:cut])
    opt = torch.optim.SGD(units.parameters(), lr=0.01, momentum=0.9)
    edge = nn.Sequential(_StubHead()) if cut < len(model) else nn.Sequential()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        split_step(units, edge, x, y, opt, None, micro_batch=micro_batch, segments=tuple(segments))
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16,resnet18,mobilenetv2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--divisor", type=float, default=100.0, help="budget = (a) / divisor")
    ap.add_argument("--flops-per-s", type=float, default=10e9, help="device speed for the manager's plan")
    ap.add_argument("--round-trip-s", type=float, default=0.02, help="link time one more micro-batch adds")
    ap.add_argument("--steps", type=int, default=3, help="timed device steps per configuration (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (measured and timed steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.perf_counter()
    rows, failed = [], False
    with HeapMeter(args.threads, cache=False) as meter:  # every figure measured in this run
        print(f"meter: {meter.name}; torch {torch.__version__}, {args.threads} thread(s)")
        print(f"batch {args.batch}, SGD momentum; manager: flops_per_s={args.flops_per_s:.3g}, round_trip_s={args.round_trip_s}; "
              f"budget = (a)/{args.divisor:g}")
        for name in models:
            model = build_model(name)
            shape, L = default_input_shape(name), len(model)
            cache = ProfileCache(meter, OPTIMIZER)
            profile_at = lambda m, _n=name, _m=model, _s=shape: cache.get(_n, _m, _s, m)  # noqa: E731
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn((args.batch, *shape), generator=g), torch.randint(0, 10, (args.batch,), generator=g)

            a = meter.step_peak(model, shape, args.batch, optimizer=OPTIMIZER, to_edge=False)
            budget = int(a / args.divisor)
            manager = OnDeviceManager(profile_at, batch=args.batch, slots=SLOTS, flops_per_s=args.flops_per_s,
                                      round_trip_s=args.round_trip_s)
            whole = manager.plan(L, 2**62)
            print(f"\n== {name} (L={L}) ==")
            print(f"(a) whole model on the device, meter: {a / MB:.3f} MB (model predicts {whole.peak_bytes / MB:.3f} MB)")
            print(f"budget = (a)/{args.divisor:g} = {budget / MB:.3f} MB")
            t0 = time.perf_counter()
            plan = manager.deepest_fitting_cut(L, budget)
            plan_ms = 1e3 * (time.perf_counter() - t0)
            if plan is None:
                print("no plan fits the budget at any cut: the model predicts every plan above it")
                failed = True
                continue
            b = meter.step_peak(model[: plan.cut], shape, args.batch, micro_batch=plan.micro_batch, segments=plan.segments,
                                optimizer=OPTIMIZER, to_edge=plan.cut < L)
            fits = b <= budget
            failed = failed or not fits
            print(f"plan: {fmt_plan(plan)}; predicted {plan.peak_bytes / MB:.3f} MB, peak at {plan.memory.phase} "
                  f"(planned in {plan_ms:.0f} ms, profiles measured beforehand)")
            print(f"(b) under the plan, meter: {b / MB:.3f} MB; within the budget: {'yes' if fits else 'NO'}; "
                  f"(a)/(b) = {a / b:.1f}x")
            step_flops = (1 + BACKWARD_FLOPS) * profile_at(args.batch).flops(1, plan.cut)
            flops_pct = 100 * plan.recompute_flops / step_flops
            t_plan = device_seconds(model, plan.cut, x, y, micro_batch=plan.micro_batch, segments=plan.segments, steps=args.steps)
            t_plain = device_seconds(model, plan.cut, x, y, steps=args.steps)
            wall_pct = 100 * (t_plan / t_plain - 1)
            print(f"recompute overhead: {flops_pct:.1f}% FLOPs; device-side wall time {1e3 * t_plan:.1f} ms vs "
                  f"{1e3 * t_plain:.1f} ms whole-batch at cut {plan.cut} ({wall_pct:+.1f}%, micro-batching included)")
            rows.append((name, a, budget, b, a / b, plan, flops_pct, wall_pct))

    print("\n== summary (all peaks by the meter) ==")
    print(f"{'model':<12}{'(a) MB':>9}{'budget MB':>11}{'(b) MB':>9}{'(a)/(b)':>9}  {'cut':>4}{'micro':>6}  {'segments':<12}"
          f"{'recompute FLOPs':>16}{'wall':>9}")
    for name, a, budget, b, ratio, plan, flops_pct, wall_pct in rows:
        segs = ",".join(f"{s}-{e}" if s != e else f"{s}" for s, e in plan.segments) or "none"
        print(f"{name:<12}{a / MB:>9.2f}{budget / MB:>11.3f}{b / MB:>9.3f}{ratio:>8.1f}x  {plan.cut:>4}{plan.micro_batch:>6}  "
              f"{segs:<12}{flops_pct:>15.1f}%{wall_pct:>+8.1f}%")
    print(f"wall time of the benchmark: {time.perf_counter() - started:.0f} s")
    if failed or len(rows) < len(models):
        print("FAILED: a model had no plan, or a measured peak exceeded its budget")
    print(f"min_ratio={min((r[4] for r in rows), default=float('nan')):.2f}")
    return 1 if failed or len(rows) < len(models) else 0


if __name__ == "__main__":
    sys.exit(main())
