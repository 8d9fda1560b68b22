"""Wall-clock seconds per round: ``smartsplit launch --local`` (every role a process, gRPC with mutual TLS on
loopback) against the embedded engine (one process), on the same config and seed, measured in one run.

Both runs write ``wall_s`` per round into their ``metrics.jsonl`` (from the round's planning to its evaluation);
this prints them side by side, the ratio, and the whole commands' wall time. Round 1 of the launch includes
waiting for the device processes to start (a torch import each). It also checks that both runs trained the
same thing (accuracy and loss per round equal).

    .venv/bin/python benchmarks/deployed_rounds.py                 # configs/fmnist.yaml, 8 devices, 2 edges
    .venv/bin/python benchmarks/deployed_rounds.py --set training.rounds=3
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
from pathlib import Path

DEFAULTS = ["fleet.devices=8", "edge.servers=2", "training.devices_per_round=8", "training.rounds=5",
            "training.local_steps=10"]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smartsplit.cli", *command], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fmnist.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    sets = [a for o in DEFAULTS + args.set for a in ("--set", o)]
    print(f"measured on {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.config} {' '.join(DEFAULTS + args.set)}")
    with tempfile.TemporaryDirectory() as folder:
        embedded, deployed = Path(folder) / "embedded", Path(folder) / "deployed"
        embedded_s = timed(["run", args.config, *sets, "--out", str(embedded), "--quiet"])
        deployed_s = timed(["launch", args.config, "--local", *sets, "--out", str(deployed), "--quiet"])
        ours, theirs = rounds(embedded), rounds(deployed)
    print(f"{'round':>5}  {'embedded wall s':>15}  {'launch --local wall s':>21}  {'ratio':>6}  {'same accuracy and loss':>22}")
    for a, b in zip(ours, theirs):
        same = a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]
        print(f"{a['round']:>5}  {a['wall_s']:>15.2f}  {b['wall_s']:>21.2f}  {b['wall_s'] / a['wall_s']:>6.2f}  {str(same):>22}")
    later = slice(1, None)
    mean_a = sum(r["wall_s"] for r in ours[later]) / max(len(ours) - 1, 1)
    mean_b = sum(r["wall_s"] for r in theirs[later]) / max(len(theirs) - 1, 1)
    print(f"rounds 2..{len(ours)}, mean: embedded {mean_a:.2f} s, launch --local {mean_b:.2f} s, ratio {mean_b / mean_a:.2f}")
    wire = theirs[-1].get("wire", {})
    print(f"last round on the wire: {wire.get('frames_up', 0) / 2**20:.1f} MiB up, {wire.get('frames_down', 0) / 2**20:.1f} MiB "
          f"down in frames; simulated bytes {theirs[-1]['bytes_up'] / 2**20:.1f} MiB up, {theirs[-1]['bytes_down'] / 2**20:.1f} MiB down")
    print(f"whole command: embedded {embedded_s:.1f} s, launch --local {deployed_s:.1f} s (process start-up included)")


if __name__ == "__main__":
    main()
