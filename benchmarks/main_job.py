"""Where the main job's time goes: `make run`'s command timed whole, then each of its runs profiled by phase.

First it times `smartsplit compare configs/fmnist.yaml --strategies fedavg,splitfed,smartsplit` as `make run`
runs it (all cores; the runs scheduled as `compare` schedules them). Then it runs each strategy alone on one
core with the sequential engine, in a fresh process, and splits its wall time into phases by timing the
functions that do each: start-up (imports, then building the experiment: data, fleet, traces, model, memory
profiles), planning (the candidates' forecasts and the strategy's choice), training (the rest of each round:
device and edge steps, the simulated clock, aggregation), evaluation (the test set, each round), memory
figures (the meter's lookups and measurements), and writing (metrics, decisions, state, summary). Seconds
are wall time (perf_counter) on this machine.

    .venv/bin/python benchmarks/main_job.py                 # the command, then the three profiles
    .venv/bin/python benchmarks/main_job.py --no-command    # the profiles only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()
CONFIG = "configs/fmnist.yaml"
STRATEGIES = "fedavg,splitfed,smartsplit"


def timed(owner, name: str, totals: dict, phase: str) -> None:
    """Wrap ``owner.name`` so that the seconds spent in it (outermost calls only) add to ``totals[phase]``."""
    inner = getattr(owner, name)
    depth = [0]

    def wrapper(*args, **kwargs):
        if depth[0]:
            return inner(*args, **kwargs)
        depth[0] += 1
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            depth[0] -= 1
            totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - started

    setattr(owner, name, wrapper)


def profile(strategy: str, out: str) -> dict:
    """One run of the main job's config under ``strategy``, its wall time split into phases."""
    from smartsplit.config import load_config
    from smartsplit.engine import experiment as experiment_module
    from smartsplit.meter.heap import HeapMeter
    from smartsplit.roles import central
    from smartsplit.runtime import embedded

    imported = time.perf_counter() - STARTED
    totals: dict[str, float] = {}
    timed(experiment_module.Experiment, "__init__", totals, "build")
    timed(experiment_module.Experiment, "candidates", totals, "planning")
    timed(central.CentralRole, "plan_round", totals, "planning")
    timed(central, "evaluate", totals, "evaluation")
    timed(HeapMeter, "_cached", totals, "memory figures")
    timed(experiment_module.Experiment, "run_round", totals, "rounds")
    config = load_config(CONFIG, [f"strategy.name={strategy}", "engine=sequential", f"output_dir={out}"])
    started = time.perf_counter()
    summary = embedded.run_experiment(config, progress=False, overwrite=True)
    run_s = time.perf_counter() - started
    inside_rounds = totals.get("planning", 0.0) + totals.get("evaluation", 0.0) + totals.get("memory figures", 0.0)
    build = totals.get("build", 0.0)
    return {
        "strategy": strategy, "final_accuracy": summary.final_accuracy,
        "start-up": imported + build,
        "planning": totals.get("planning", 0.0),
        "training": totals.get("rounds", 0.0) - inside_rounds,
        "evaluation": totals.get("evaluation", 0.0),
        "memory figures": totals.get("memory figures", 0.0),
        "writing": run_s - build - totals.get("rounds", 0.0),
        "total": imported + run_s,
    }


PHASES = ("start-up", "planning", "training", "evaluation", "memory figures", "writing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-command", action="store_true", help="skip timing the whole compare command")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one strategy
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(profile(args.one, args.out)))
        return
    import torch

    print(f"measured on {platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}; seconds are wall time")
    with tempfile.TemporaryDirectory() as out:
        if not args.no_command:
            command = [os.path.join(os.path.dirname(sys.executable), "smartsplit"), "compare", CONFIG,
                       "--strategies", STRATEGIES, "--overwrite", "--quiet", "--set", f"output_dir={out}"]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            whole = time.perf_counter() - started
            print(f"make run's command ({' '.join(command[1:5])} ...): {whole:.1f} s = {whole / 60:.2f} min "
                  f"(target: under 4 min)")
        print(f"\neach run alone, sequential engine, one core:\n{'strategy':>10}  " +
              "  ".join(f"{p:>14}" for p in (*PHASES, "total")) + "  final acc")
        rows = []
        for strategy in STRATEGIES.split(","):
            child = subprocess.run([sys.executable, __file__, "--one", strategy, "--out", out], capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{strategy} failed:\n{child.stderr[-2000:]}")
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{strategy:>10}  " + "  ".join(f"{row[p]:>8.1f} {100 * row[p] / row['total']:>3.0f}%" for p in PHASES)
                  + f"  {row['total']:>14.1f}  {row['final_accuracy']:.4f}", flush=True)
        total = sum(r["total"] for r in rows)
        print(f"{'all':>10}  " + "  ".join(f"{sum(r[p] for r in rows):>8.1f} {100 * sum(r[p] for r in rows) / total:>3.0f}%"
                                        for p in PHASES) + f"  {total:>14.1f}")
        print(f"one core's work over all runs: {total:.1f} s; on {os.cpu_count()} cores at best {total / (os.cpu_count() or 1):.1f} s")


if __name__ == "__main__":
    main()
