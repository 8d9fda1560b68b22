"""The memory model against the memory meter: predicted device peak vs the peak the meter measures.

For every zoo model, every cut 1..L, every micro-batch size (the batch, halving down to 1) and, at each, the plain
plan (nothing recomputed) and the optimal checkpoint plan for a budget of half the plain saved activations:
``device_memory`` (built from per-unit figures the meter measured on each unit alone) against the meter's peak
of one whole steady-state device step (SGD with momentum; forward to the cut, the returned gradient, backward,
micro-batches accumulated, optimizer step).

The meter (``smartsplit.meter.heap``): a malloc counter preloaded into a child process, so it sees every heap
byte of the step, oneDNN's and BLAS's scratch and autograd's graph included, with the kernels training runs
with (oneDNN on, torch's default). It does not see mmap'd memory outside malloc (Python's small-object arenas,
code, stacks) or heap fragmentation.

The model must be an upper bound (no row below the meter) within ``--tolerance`` (default 10%) above it.

Run: ``.venv/bin/python benchmarks/memory_model.py [--models cnn,vgg16] [--batch 32] [--micro 32,8,1]``.
Exits 1 if a row is under the meter or over by more than the tolerance.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from smartsplit.memory.model import activation_bytes, device_memory
from smartsplit.memory.ondevice import micro_batch_sizes
from smartsplit.memory.planner import plan_segments
from smartsplit.meter.heap import HeapMeter
from smartsplit.models.profile import ProfileCache
from smartsplit.models.zoo import MODELS, build_model, default_input_shape

MB = 2**20
OPTIMIZER = ("sgd", 0.01, 0.9)
SLOTS = 1  # SGD with momentum: one buffer per parameter


def describe(meter: HeapMeter) -> str:
    return f"{meter.name}; torch {torch.__version__}, {meter.threads} thread(s), oneDNN available: {torch.backends.mkldnn.is_available()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", default="", help="comma-separated micro-batch sizes (default: the batch, halving to 1)")
    ap.add_argument("--width", type=float, default=1.0, help="width multiplier of the zoo models")
    ap.add_argument("--tolerance", type=float, default=0.10, help="largest over-estimate allowed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the measured steps")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    micros = [int(m) for m in args.micro.split(",")] if args.micro else micro_batch_sizes(args.batch)
    started = time.perf_counter()
    rows = []
    with HeapMeter(args.threads, cache=False) as meter:  # every figure measured in this run
        print(f"meter: {describe(meter)}")
        print(f"batch {args.batch}, width {args.width}, SGD momentum; plans: plain, and optimal for half the plain activations")
        print(f"{'model':<12}{'cut':>4}/{'L':<3}{'micro':>6}  {'segments':<18}{'predicted MB':>13}{'meter MB':>10}{'error':>8}  peak at")
        cache = ProfileCache(meter, OPTIMIZER)
        for name in models:
            model = build_model(name, width=args.width)
            shape, L = default_input_shape(name), len(model)
            for micro in micros:
                profile = cache.get(name, model, shape, micro)
                for cut in range(1, L + 1):
                    plans = [()]
                    half = plan_segments(profile, cut, activation_bytes(profile, cut) // 2) if cut > 1 else None
                    if half is not None and half.segments:
                        plans.append(half.segments)
                    for segments in plans:
                        predicted = device_memory(profile, cut, slots=SLOTS, segments=segments,
                                                  micro_batches=math.ceil(args.batch / micro))
                        measured = meter.step_peak(model[:cut], shape, args.batch, micro_batch=micro, segments=segments,
                                                   optimizer=OPTIMIZER, to_edge=cut < L)
                        error = (predicted.total - measured) / measured
                        rows.append((name, cut, micro, segments, predicted.total, measured, error))
                        seg_txt = ",".join(f"{a}-{b}" for a, b in segments) or "none"
                        print(f"{name:<12}{cut:>4}/{L:<3}{micro:>6}  {seg_txt:<18}{predicted.total / MB:>13.3f}"
                              f"{measured / MB:>10.3f}{100 * error:>+7.2f}%  {predicted.phase}", flush=True)

    under = [r for r in rows if r[6] < 0]
    over = [r for r in rows if r[6] > args.tolerance]
    worst = max(rows, key=lambda r: r[6])
    print()
    print(f"rows: {len(rows)}; wall time {time.perf_counter() - started:.0f} s")
    print(f"under the meter: {len(under)}; more than {100 * args.tolerance:.0f}% over: {len(over)}")
    print(f"error: min {100 * min(r[6] for r in rows):+.2f}%, max {100 * worst[6]:+.2f}% "
          f"({worst[0]} cut {worst[1]} micro-batch {worst[2]}), mean {100 * sum(r[6] for r in rows) / len(rows):+.2f}%")
    for r in under + over:
        print(f"  OUT OF BOUNDS: {r[0]} cut {r[1]} micro {r[2]} segments {r[3]}: {r[4]} predicted, {r[5]} measured")
    return 1 if under or over else 0


if __name__ == "__main__":
    sys.exit(main())
