"""Headline: how much less device memory SmartSplit needs than training the whole model on the device.

At batch 32 on 32x32x3 inputs, for vgg16 and resnet18 (and mobilenetv2 for information):
  (a) the measured peak of training the whole model on the device (cut = L, nothing recomputed);
  budget = (a) / 100;
  the on-device manager (``OnDeviceManager.deepest_fitting_cut``) picks the deepest cut and the plan
  (micro-batch, checkpointed segments) whose predicted peak fits that budget;
  (b) the measured device-side peak of a few real split steps under that plan (edge = the remaining units).
(b) must not exceed the budget (exit 1 otherwise). Printed: (a), (b), (a)/(b), the plan, and the step-time
overhead against training at the same cut without the budget (whole batch, nothing recomputed): the wall time
of a real device + edge step on this machine, the wall time of the device side alone (edge stubbed), and the
simulated device time (the plan's ``compute_s`` plus a
round trip per micro-batch, against the plain plan's).

Where it measures: as ``benchmarks/memory_model.py`` (cpu: saved-tensor hooks + live tensor bytes, in-flight
gradients from the model; cuda: the allocator's ``max_memory_allocated``). The last line is
``min_ratio=<value>``: the smaller (a)/(b) of vgg16 and resnet18.

Run: ``.venv/bin/python benchmarks/device_memory.py [--quick] [--flops-per-s 10e9] [--round-trip-s 0.02]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory_model import SLOTS, MB, add_device_options, batch_for, device_from, measure_split, measured_on  # noqa: E402

from smartsplit.engine.step import split_step  # noqa: E402
from smartsplit.managers.device import OnDeviceManager  # noqa: E402
from smartsplit.models.profile import ProfileCache  # noqa: E402
from smartsplit.models.zoo import build_model, default_input_shape  # noqa: E402

HEADLINE = ("vgg16", "resnet18")


def fmt_plan(plan) -> str:
    segs = ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in plan.segments) or "none"
    return f"cut {plan.cut}, micro-batch {plan.micro_batch} ({plan.round_trips} round trips), checkpointed segments {segs}"


def best_after_warmup(times: list[float]) -> float:
    """Fastest step after the first (a warm-up) when there are several: the least disturbed by other load."""
    return min(times[1:] if len(times) > 1 else times)


class _StubHead(nn.Module):
    """Stands in for the edge when timing the device side alone: ten of the activation's features as logits."""

    def forward(self, received: torch.Tensor) -> torch.Tensor:
        return received.flatten(1)[:, :10]


def device_side_times(model: nn.Sequential, cut: int, x, y, dev, *, micro_batch=None, segments=(), steps=1) -> list[float]:
    """Wall time of the device's part of a step (forward to the cut, backward from a returned gradient,
    optimizer step), with the edge replaced by a stub that costs nothing."""
    units = copy.deepcopy(model[:cut]).to(dev)
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.SGD(units.parameters(), lr=0.01, momentum=0.9)
    edge = nn.Sequential(_StubHead()) if cut < len(model) else nn.Sequential()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        split_step(units, edge, x, y, opt, None, micro_batch=micro_batch, segments=tuple(segments))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16,resnet18,mobilenetv2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--divisor", type=float, default=100.0, help="budget = (a) / divisor")
    ap.add_argument("--flops-per-s", type=float, default=10e9, help="device speed for the manager's plan")
    ap.add_argument("--round-trip-s", type=float, default=0.02, help="link time one more micro-batch adds")
    ap.add_argument("--steps", type=int, default=3, help="real steps per configuration (with more than one, the first "
                    "is a warm-up for the timings and the fastest of the rest is reported; memory is the largest over all)")
    ap.add_argument("--quick", action="store_true", help="vgg16 and resnet18 only, one step each")
    add_device_options(ap)
    args = ap.parse_args(argv)
    dev = device_from(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    steps = args.steps
    if args.quick:
        models = [m for m in models if m in HEADLINE]
        steps = 1
    t_start = time.perf_counter()

    print(f"measured on: {measured_on(dev)}")
    print(f"batch {args.batch}, SGD momentum (slots={SLOTS}); manager: flops_per_s={args.flops_per_s:.3g}, "
          f"round_trip_s={args.round_trip_s}; budget = (a)/{args.divisor:g}")
    if dev.type == "cpu":
        print("in-flight gradients come from the model; recompute peaks are measured by re-running each checkpointed "
              "segment under saved-tensor hooks")
    ratios: dict[str, float] = {}
    failed = False
    rows = []
    for name in models:
        model = build_model(name)
        shape = default_input_shape(name)
        L = len(model)
        cache = ProfileCache()
        profile_at = lambda m, _name=name, _model=model, _shape=shape: cache.get(_name, _model, _shape, m)  # noqa: E731
        x, y = batch_for(shape, args.batch)

        manager = OnDeviceManager(profile_at, batch=args.batch, slots=SLOTS, flops_per_s=args.flops_per_s,
                                  round_trip_s=args.round_trip_s)
        whole = manager.plan(L, 2**62)  # cut L with no budget: the plain whole-model plan
        meas_a, _ = measure_split(model, L, x, y, profile_at(args.batch), dev, steps=1)
        a = meas_a.total
        budget = int(a / args.divisor)
        print(f"\n== {name} (L={L}) ==")
        print(f"(a) whole model on the device: measured {a / MB:.3f} MB (predicted {whole.peak_bytes / MB:.3f} MB)")
        print(f"budget = (a)/{args.divisor:g} = {budget / MB:.3f} MB")

        t0 = time.perf_counter()
        plan = manager.deepest_fitting_cut(L, budget)
        plan_s = time.perf_counter() - t0
        if plan is None:
            print("no plan fits the budget at any cut")
            failed = failed or name in HEADLINE
            continue
        print(f"plan: {fmt_plan(plan)}; predicted peak {plan.peak_bytes / MB:.3f} MB "
              f"(deepest_fitting_cut took {1e3 * plan_s:.1f} ms; profiles at every micro-batch size were already cached)")

        meas_b, t_plan = measure_split(model, plan.cut, x, y, profile_at(plan.micro_batch), dev,
                                       micro_batch=plan.micro_batch, segments=plan.segments, steps=steps)
        b = meas_b.total
        ok = b <= budget
        failed = failed or not ok
        ratio = a / b
        ratios[name] = ratio
        if dev.type == "cpu":
            parts = (f"= {meas_b.static / MB:.3f} static + {meas_b.input / MB:.3f} input + {meas_b.activations / MB:.3f} "
                     f"activations (held {meas_b.held / MB:.3f}) + {meas_b.cut_io / MB:.3f} cut io + "
                     f"{meas_b.in_flight / MB:.3f} in-flight")
        else:
            parts = "(allocator peak)"
        print(f"(b) under the plan: measured {b / MB:.3f} MB {parts}")
        print(f"(b) <= budget: {'yes' if ok else 'NO'}; (a)/(b) = {ratio:.1f}x")

        # the same cut without the budget: whole batch, nothing recomputed
        _, t_plain = measure_split(model, plan.cut, x, y, profile_at(args.batch), dev, steps=steps)
        plain = OnDeviceManager(profile_at, batch=args.batch, slots=SLOTS, flops_per_s=args.flops_per_s,
                                round_trip_s=args.round_trip_s, checkpointing=False).plan(plan.cut, 2**62)
        wall_plan, wall_plain = best_after_warmup(t_plan), best_after_warmup(t_plain)
        dev_plan = best_after_warmup(device_side_times(model, plan.cut, x, y, dev, micro_batch=plan.micro_batch,
                                                         segments=plan.segments, steps=steps))
        dev_plain = best_after_warmup(device_side_times(model, plan.cut, x, y, dev, steps=steps))
        link = plan.cut < L
        sim_plan = plan.compute_s + (plan.round_trips * args.round_trip_s if link else 0.0)
        sim_plain = plain.compute_s + (plain.round_trips * args.round_trip_s if link else 0.0)
        timed = lambda ts: "/".join(f"{1e3 * t:.0f}" for t in (ts[1:] if len(ts) > 1 else ts))  # noqa: E731
        print(f"step wall time, device + edge (this machine, best of {max(1, len(t_plan) - 1)} step(s) after "
              f"{'one warm-up' if len(t_plan) > 1 else 'none'}): plan {1e3 * wall_plan:.1f} ms [{timed(t_plan)}] vs plain at "
              f"cut {plan.cut} {1e3 * wall_plain:.1f} ms [{timed(t_plain)}] "
              f"-> overhead {100 * (wall_plan / wall_plain - 1):+.1f}% (the edge runs each micro-batch too)")
        print(f"step wall time, device side only (edge stubbed): plan {1e3 * dev_plan:.1f} ms vs plain {1e3 * dev_plain:.1f} ms "
              f"-> overhead {100 * (dev_plan / dev_plain - 1):+.1f}%")
        print(f"simulated device time per step: plan {1e3 * sim_plan:.2f} ms (compute {1e3 * plan.compute_s:.2f}, of which "
              f"recompute {1e3 * plan.recompute_s:.2f}; {plan.round_trips} round trips) vs plain {1e3 * sim_plain:.2f} ms "
              f"-> overhead {100 * (sim_plan / sim_plain - 1):+.1f}%")
        rows.append((name, a, budget, b, ratio, plan, wall_plan / wall_plain - 1, dev_plan / dev_plain - 1, sim_plan / sim_plain - 1))

    print("\n== summary ==")
    print(f"{'model':<12}{'(a) MB':>10}{'budget MB':>11}{'(b) MB':>9}{'(a)/(b)':>9}  {'cut':>4}{'micro':>6}  {'segments':<14}"
          f"{'wall ovh':>9}{'dev ovh':>9}{'sim ovh':>9}")
    for name, a, budget, b, ratio, plan, wall_ovh, dev_ovh, sim_ovh in rows:
        segs = ",".join(f"{s}-{e}" if s != e else f"{s}" for s, e in plan.segments) or "none"
        print(f"{name:<12}{a / MB:>10.2f}{budget / MB:>11.3f}{b / MB:>9.3f}{ratio:>8.1f}x  {plan.cut:>4}{plan.micro_batch:>6}  "
              f"{segs:<14}{100 * wall_ovh:>+8.1f}%{100 * dev_ovh:>+8.1f}%{100 * sim_ovh:>+8.1f}%")
    print("wall ovh: real device + edge step; dev ovh: real device side alone; sim ovh: simulated device time "
          "(compute_s + a round trip per micro-batch); all against the whole-batch step at the same cut")
    print(f"wall time of the benchmark: {time.perf_counter() - t_start:.1f} s")
    headline = [ratios[m] for m in HEADLINE if m in ratios]
    if failed:
        print("FAILED: a measured peak exceeded its budget, or no plan fit")
    if len(headline) < len([m for m in HEADLINE if m in models]) or not headline:
        print("min_ratio=nan")
        return 1
    print(f"min_ratio={min(headline):.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
