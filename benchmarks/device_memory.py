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

The measurement itself is ``smartsplit.reports.memory_claim.measure_memory_claim``, which ``smartsplit reproduce``
calls too; this script adds the per-model detail and the wall-time comparison.

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

from smartsplit.kernels.step import reference_step
from smartsplit.meter.heap import HeapMeter
from smartsplit.models.zoo import build_model, default_input_shape
from smartsplit.records import MB
from smartsplit.reports.memory_claim import measure_memory_claim, plan_text, segments_text


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
        reference_step(units, edge, x, y, opt, None, micro_batch=micro_batch, segments=tuple(segments))
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def report_claim(claim, model, x, y, steps: int) -> tuple | None:
    """Print one model's figures and time its plan; the summary row, or None when no plan fits."""
    divisor = f"{claim.divisor:g}"
    print(f"\n== {claim.model} (L={claim.units}) ==")
    print(f"(a) whole model on the device, meter: {claim.whole_bytes / MB:.3f} MB (model predicts "
          f"{claim.whole_predicted_bytes / MB:.3f} MB)")
    print(f"budget = (a)/{divisor} = {claim.budget_bytes / MB:.3f} MB")
    plan = claim.plan
    if plan is None:
        print("no plan fits the budget at any cut: the model predicts every plan above it")
        return None
    print(f"plan: {plan_text(plan)}; predicted {plan.peak_bytes / MB:.3f} MB, peak at {plan.memory.phase} "
          f"(planned in {claim.plan_ms:.0f} ms, profiles measured beforehand)")
    print(f"(b) under the plan, meter: {claim.device_bytes / MB:.3f} MB; within the budget: "
          f"{'yes' if claim.fits else 'NO'}; (a)/(b) = {claim.ratio:.1f}x")
    t_plan = device_seconds(model, plan.cut, x, y, micro_batch=plan.micro_batch, segments=plan.segments, steps=steps)
    t_plain = device_seconds(model, plan.cut, x, y, steps=steps)
    wall_pct = 100 * (t_plan / t_plain - 1)
    print(f"recompute overhead: {claim.recompute_flops_pct:.1f}% FLOPs; device-side wall time {1e3 * t_plan:.1f} ms vs "
          f"{1e3 * t_plain:.1f} ms whole-batch at cut {plan.cut} ({wall_pct:+.1f}%, micro-batching included)")
    return claim, wall_pct


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16,resnet18,mobilenetv2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--divisor", type=float, default=100.0, help="budget = (a) / divisor")
    ap.add_argument("--flops-per-s", type=float, default=10e9, help="device speed for the manager's plan")
    ap.add_argument("--round-trip-s", type=float, default=0.02, help="link time one more micro-batch adds")
    ap.add_argument("--steps", type=int, default=3, help="timed device steps per configuration (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (measured and timed steps)")
    ap.add_argument("--width", type=float, default=1.0, help="the models' width multiplier")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.perf_counter()
    rows, failed = [], False
    with HeapMeter(args.threads, cache=False) as meter:  # every figure measured in this run
        print(f"meter: {meter.name}; torch {torch.__version__}, {args.threads} thread(s); width {args.width:g}")
        print(f"batch {args.batch}, SGD momentum; manager: flops_per_s={args.flops_per_s:.3g}, round_trip_s={args.round_trip_s}; "
              f"budget = (a)/{args.divisor:g}")
        for name in models:
            model, shape = build_model(name, width=args.width), default_input_shape(name)
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn((args.batch, *shape), generator=g), torch.randint(0, 10, (args.batch,), generator=g)
            claim = measure_memory_claim(name, model, shape, meter, width=args.width, batch=args.batch, divisor=args.divisor,
                                         flops_per_s=args.flops_per_s, round_trip_s=args.round_trip_s)
            row = report_claim(claim, model, x, y, args.steps)
            failed = failed or row is None or not claim.fits
            if row is not None:
                rows.append(row)

    print("\n== summary (all peaks by the meter) ==")
    print(f"{'model':<12}{'(a) MB':>9}{'budget MB':>11}{'(b) MB':>9}{'(a)/(b)':>9}  {'cut':>4}{'micro':>6}  {'segments':<12}"
          f"{'recompute FLOPs':>16}{'wall':>9}")
    for claim, wall_pct in rows:
        plan = claim.plan
        print(f"{claim.model:<12}{claim.whole_bytes / MB:>9.2f}{claim.budget_bytes / MB:>11.3f}{claim.device_bytes / MB:>9.3f}"
              f"{claim.ratio:>8.1f}x  {plan.cut:>4}{plan.micro_batch:>6}  {segments_text(plan):<12}"
              f"{claim.recompute_flops_pct:>15.1f}%{wall_pct:>+8.1f}%")
    print(f"wall time of the benchmark: {time.perf_counter() - started:.0f} s")
    if failed or len(rows) < len(models):
        print("FAILED: a model had no plan, or a measured peak exceeded its budget")
    print(f"min_ratio={min((r[0].ratio for r in rows), default=float('nan')):.2f}")
    return 1 if failed or len(rows) < len(models) else 0


if __name__ == "__main__":
    sys.exit(main())
