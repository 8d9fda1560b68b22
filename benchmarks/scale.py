"""Round time, planning time and memory against fleet size: 100 to 100,000 devices, each size and strategy in a
fresh process.

Every device holds two synthetic examples at every size (IID), so a round trains the same amount whatever the
fleet: 10 devices, `configs/fmnist.yaml`'s model, local steps and device mix, the memory meter off. Per size:
"experiment" is building it (fleet, traces, shards, roles); "planning" is the central server's part of a round
(every online device as a candidate, then the strategy's choice of devices and cuts, which predicts plans and
times for the cuts it reads); "round" is the whole round as `smartsplit run` runs it (planning, training,
aggregation, evaluation on 100 test examples), rounds 1 and 2, after a warm-up that every process pays once
whatever its fleet (torch's first optimizer imports `torch._dynamo`; the first forward and backward set up
their kernels). Resident memory (MB) is the process's once the experiment is built ("RSS built"), after round 2
("RSS after") and at its peak; "data MB" is the training set's share (it grows with the fleet here, two
examples a device). The last lines compare each size with the smallest: round 1 and
planning 1 as ratios, and what the process holds beyond its data (RSS after round 2 less the training set), in
all and more than the smallest fleet's process does (torch, the model and a round's working memory are in both).

    .venv/bin/python benchmarks/scale.py                       # 100, 1000, 10000, 100000 devices; smartsplit, fedavg
    .venv/bin/python benchmarks/scale.py --sizes 100,1000 --strategies fedavg --set fleet.budgets.kind=foreground
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time


def resident_mb() -> float:
    """This process's resident memory now (Linux), or NaN."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def warm_up(experiment) -> None:
    """What a process pays once whatever its fleet, kept out of round 1 as ``smartsplit run`` keeps it: torch
    imports ``torch._dynamo`` when it makes its first optimizer (``start_optimizers``, seconds), and the first
    forward and backward set up their kernels."""
    from smartsplit.kernels.step import start_optimizers

    start_optimizers(experiment.config.training.optimizer)
    copy.deepcopy(experiment.architecture)(experiment.train.x[:2]).sum().backward()


def measure(devices: int, strategy: str, sets: list[str]) -> dict:
    from smartsplit.config import load_config
    from smartsplit.engine.experiment import Experiment
    from smartsplit.runtime.allocator import collector_frozen, tune_allocator

    config = load_config("configs/fmnist.yaml", [
        f"fleet.devices={devices}", "meter=false", "data.dataset=synthetic", f"data.synthetic_train={2 * devices}",
        "data.synthetic_test=100", "data.partition=iid", f"strategy.name={strategy}",
        "training.grouping=never",  # auto's one-time timing (kept per machine) is not what this benchmark measures
        *sets,
    ])
    tune_allocator()  # as `smartsplit run` does
    started = time.perf_counter()
    experiment = Experiment(config)
    built = time.perf_counter() - started
    rss_built = resident_mb()
    warm_up(experiment)
    planning: list[float] = []
    plan_round = experiment.central.plan_round

    def timed_plan_round(rnd, candidates, k):  # candidates() runs just before, inside run_round: timed with it
        result = plan_round(rnd, candidates, k)
        planning.append(time.perf_counter() - round_started)
        return result

    experiment.central.plan_round = timed_plan_round
    rounds = []
    with collector_frozen():  # as `smartsplit run` does
        for rnd in range(2):
            round_started = time.perf_counter()
            record = experiment.run_round(rnd)
            rounds.append(time.perf_counter() - round_started)
    return {"devices": devices, "strategy": strategy, "experiment_s": built, "plan1_s": planning[0],
            "round1_s": rounds[0], "plan2_s": planning[1], "round2_s": rounds[1], "participants": record.participants,
            "data_mb": experiment.train.x.nbytes / 2**20, "rss_built_mb": rss_built, "rss_after_mb": resident_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--strategies", default="smartsplit,fedavg")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # the child process: one size, one strategy
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.set)))
        return
    print(f"measured on {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; meter off; "
          f"{' '.join(args.set) or 'configs/fmnist.yaml fleet mix'}; seconds are wall time (perf_counter)")
    print(f"{'strategy':>10}  {'devices':>8}  {'experiment s':>12}  {'planning 1 s':>12}  {'round 1 s':>9}  "
          f"{'planning 2 s':>12}  {'round 2 s':>9}  {'trained':>7}  {'data MB':>7}  {'RSS built':>9}  {'RSS after':>9}  "
          f"{'peak RSS MB':>11}")
    rows = []
    for strategy in args.strategies.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            child = subprocess.run([sys.executable, __file__, "--one", str(size), strategy,
                                    *[a for s in args.set for a in ("--set", s)]], capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{strategy} at {size} devices failed:\n{child.stderr[-2000:]}")
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{strategy:>10}  {row['devices']:>8}  {row['experiment_s']:>12.2f}  {row['plan1_s']:>12.2f}  "
                  f"{row['round1_s']:>9.2f}  {row['plan2_s']:>12.2f}  {row['round2_s']:>9.2f}  {row['participants']:>7}  "
                  f"{row['data_mb']:>7.0f}  {row['rss_built_mb']:>9.0f}  {row['rss_after_mb']:>9.0f}  {row['peak_rss_mb']:>11.0f}",
                  flush=True)
    for strategy in args.strategies.split(","):
        mine = [r for r in rows if r["strategy"] == strategy]
        base = mine[0]
        for row in mine[1:]:
            held = row["rss_after_mb"] - row["data_mb"]
            fleet = held - (base["rss_after_mb"] - base["data_mb"])
            print(f"{strategy} at {row['devices']} devices: round 1 {row['round1_s'] / base['round1_s']:.2f}x, planning 1 "
                  f"{row['plan1_s'] / base['plan1_s']:.1f}x what they take at {base['devices']}; the process holds "
                  f"{held:.0f} MB beyond the data, {fleet:.0f} MB more than at {base['devices']} devices")


if __name__ == "__main__":
    main()
