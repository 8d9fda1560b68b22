"""Planning time and memory against fleet size: how long the central server takes to build the round's
candidates (every online device's predicted plan, peak and time at every cut) for fleets of 100 to 100,000
devices, and the process's peak resident memory, each size in a fresh process.

The fleet is `configs/fmnist.yaml`'s device mix and model on synthetic data (two examples per device, IID), with
the memory meter off (profiles from saved-tensor sizes), so the figures are planning alone. "round 1" is the
first `candidates()` (every device planned at every cut), "round 2" the next one at a later clock (what is
cached is reused), "experiment" is building the experiment (fleet, traces, shards, roles).

    .venv/bin/python benchmarks/scale.py                       # 100, 1000, 10000, 100000 devices
    .venv/bin/python benchmarks/scale.py --sizes 100,1000 --set fleet.budgets.kind=foreground
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def measure(devices: int, sets: list[str]) -> dict:
    from smartsplit.config import load_config
    from smartsplit.engine.experiment import Experiment

    config = load_config("configs/fmnist.yaml", [
        f"fleet.devices={devices}", "meter=false", "data.dataset=synthetic", f"data.synthetic_train={max(2 * devices, 2000)}",
        "data.synthetic_test=100", "data.partition=iid", *sets,
    ])
    started = time.perf_counter()
    experiment = Experiment(config)
    built = time.perf_counter() - started
    started = time.perf_counter()
    first = experiment.candidates()
    round1 = time.perf_counter() - started
    experiment.clock_s += 60.0  # a round later
    started = time.perf_counter()
    second = experiment.candidates()
    round2 = time.perf_counter() - started
    return {"devices": devices, "experiment_s": built, "round1_s": round1, "round2_s": round2,
            "candidates": len(first), "candidates2": len(second),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.set)))
        return
    print(f"measured on {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; meter off; "
          f"{' '.join(args.set) or 'configs/fmnist.yaml fleet mix'}")
    print(f"{'devices':>8}  {'experiment s':>12}  {'round 1 s':>9}  {'round 2 s':>9}  {'online':>7}  {'peak RSS MB':>11}")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        child = subprocess.run([sys.executable, __file__, "--one", str(size), *[a for s in args.set for a in ("--set", s)]],
                               capture_output=True, text=True, check=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['devices']:>8}  {row['experiment_s']:>12.2f}  {row['round1_s']:>9.2f}  {row['round2_s']:>9.2f}  "
              f"{row['candidates']:>7}  {row['peak_rss_mb']:>11.0f}", flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"round 1 at {row['devices']} devices: {row['round1_s'] / base['round1_s']:.1f}x round 1 at {base['devices']}")


if __name__ == "__main__":
    main()
