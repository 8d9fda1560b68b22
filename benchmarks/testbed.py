"""The emulated testbed's fidelity and the paper's latency claim, measured in one run.

Runs `smartsplit testbed` on a config (default configs/testbed.yaml) for SmartSplit and FedAvg, then prints, from
what that run measured: which mechanism emulated each resource, the time scale, per strategy the median over
rounds of |measured / simulated - 1| (all rounds, and without round 1, which carries the processes' start-up)
against the 15% target, where the time of the slowest device went (link, edge queue, pauses, the rest), and
SmartSplit's peak round latency against FedAvg's, measured beside the simulator's figure for the same plans.

    .venv/bin/python benchmarks/testbed.py [--config configs/testbed.yaml] [--out runs/testbed-bench] [--set K=V]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.15


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/testbed.yaml")
    parser.add_argument("--out", default="runs/testbed-bench")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    started = time.monotonic()
    command = [sys.executable, "-m", "smartsplit", "testbed", args.config, "--out", args.out,
               "--strategies", "smartsplit,fedavg", "--quiet", *[a for s in args.set for a in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    result = json.loads((Path(args.out) / "testbed.json").read_text())
    host = result["host"]
    print(f"measured on {host['cpu']}, {host['cores']} cores, Linux {host['kernel']}, root {host['root']}; one core "
          f"trains the model at {host['core_gflops']:.1f} GFLOP/s; time scale {result['time_scale']:.3g}; "
          f"whole testbed {time.monotonic() - started:.0f} s wall")
    for resource, how in result["emulation"].items():
        print(f"  {resource}: {how}")
    print()
    print(f"{'strategy':<11} {'rounds':>6} {'median |m/s-1|':>15} {'rounds 2+':>10} {'target':>7}   link   queue  paused"
          "    rest  simulated")
    for name, data in result["strategies"].items():
        later = data["fidelity_after_round_1"]
        verdict = "-" if later is None else ("met" if later <= TARGET else "missed")
        slow = [r["slowest"] for r in data["rounds"][1:] if r.get("slowest")] or \
               [r["slowest"] for r in data["rounds"] if r.get("slowest")]
        mean = {k: statistics.fmean(s[k] for s in slow) for k in ("comm_s", "wait_s", "paused_s", "finish_s")}
        rest = mean["finish_s"] - mean["comm_s"] - mean["wait_s"] - mean["paused_s"]
        simulated = statistics.fmean(r["simulated_s"] for r in data["rounds"][1:] or data["rounds"] if r["simulated_s"])
        print(f"{name:<11} {len(data['rounds']):>6} {_pct(data['fidelity']):>15} {_pct(later):>10} {verdict:>7} "
              f"{mean['comm_s']:>6.2f}  {mean['wait_s']:>6.2f}  {mean['paused_s']:>6.2f}  {rest:>6.2f}  {simulated:>9.2f}")
    if "namespace" in result["emulation"]["network"]:
        print("(links shaped by the kernel: 'link' is the link layer's latency only; transfers are in 'rest')")
    strategies = result["strategies"]
    if {"smartsplit", "fedavg"} <= set(strategies):
        s, f = strategies["smartsplit"], strategies["fedavg"]
        later = {k: max(r["measured_s"] for r in v["rounds"][1:] if r["measured_s"]) for k, v in strategies.items()
                 if len(v["rounds"]) > 1}
        print()
        print(f"peak round latency, SmartSplit against FedAvg: measured {s['peak_measured_s']:.2f} s vs "
              f"{f['peak_measured_s']:.2f} s ({_change(s['peak_measured_s'], f['peak_measured_s'])}); simulated for the "
              f"same plans {s['peak_simulated_s']:.2f} s vs {f['peak_simulated_s']:.2f} s "
              f"({_change(s['peak_simulated_s'], f['peak_simulated_s'])})")
        if len(later) == 2:
            print(f"  without round 1 (start-up): measured {later['smartsplit']:.2f} s vs {later['fedavg']:.2f} s "
                  f"({_change(later['smartsplit'], later['fedavg'])})")
        print(f"  accuracy after {len(s['rounds'])} rounds: SmartSplit {s['accuracy']:.3f}, FedAvg {f['accuracy']:.3f}")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _change(ours: float, theirs: float) -> str:
    return f"{100 * (ours / theirs - 1):+.0f}%"


if __name__ == "__main__":
    sys.exit(main())
