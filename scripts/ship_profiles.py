"""Regenerate the memory profiles shipped with SmartSplit (``src/smartsplit/meter/shipped-profiles.json``).

Runs the shipped configs with ``calibrate: true`` (every figure measured by the heap meter on this machine) into a
fresh meter cache, then keeps every figure the runs asked for: each zoo model's per-unit costs at every micro-batch
size the planner tries, and the step peaks of the plans the runs chose. ``make run``'s job runs whole, so its
plans and measured peaks all come from the file; the other configs run one round (enough for their models' unit
costs, which is what plans rest on; a later round's plan whose step peak is not shipped is measured where it runs).

    .venv/bin/python scripts/ship_profiles.py            # about 10 minutes on 2 cores

The file records this command, the machine and the torch version. Run it again when ``MEASUREMENT_VERSION``
changes, when a zoo model or a shipped config's model changes, or to ship figures from another reference machine.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from smartsplit.machine import describe
from smartsplit.meter.heap import MEASUREMENT_VERSION, SHIPPED, ShippedFigures

ROOT = Path(__file__).resolve().parent.parent
# (config, strategies, overrides): make run's job whole, the other shipped configs for one round
JOBS = [("configs/fmnist.yaml", "fedavg,splitfed,smartsplit", [])] + [
    (f"configs/{name}.yaml", "fedavg,smartsplit", ["training.rounds=1"])
    for name in ("fmnist-deep", "fmnist-dynamic", "fmnist-noniid", "latency-vgg")
]


def run_jobs(cache: Path, out: Path) -> None:
    env = {**os.environ, "SMARTSPLIT_CACHE": str(cache)}
    for config, strategies, overrides in JOBS:
        sets = [arg for o in [*overrides, "calibrate=true", f"output_dir={out}"] for arg in ("--set", o)]
        command = [sys.executable, "-m", "smartsplit.cli", "compare", str(ROOT / config), "--strategies", strategies,
                   *sets, "--quiet", "--overwrite"]
        print(f"{config} ({strategies}{', ' + ', '.join(overrides) if overrides else ''})", flush=True)
        subprocess.run(command, env=env, check=True, cwd=ROOT)


def harvest(cache: Path) -> dict:
    """Every figure in the meter's cache, keyed as ``ShippedFigures`` looks them up."""
    figures = {}
    for path in sorted((cache / "meter").glob("*.json")):
        entry = json.loads(path.read_text())
        kind, version, _digest, _torch, threads, structure, request = json.loads(entry["key"])
        if version == MEASUREMENT_VERSION:
            figures[ShippedFigures.key(kind, threads, structure, request)] = entry["value"]
    return figures


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="smartsplit-ship-") as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "runs"
        run_jobs(cache, out)
        figures = harvest(cache)
    SHIPPED.write_text(json.dumps({
        "measurement_version": MEASUREMENT_VERSION,
        "command": "python scripts/ship_profiles.py",
        "created": datetime.date.today().isoformat(),
        "machine": describe(),
        "torch": torch.__version__,
        "jobs": [{"config": c, "strategies": s, "overrides": o} for c, s, o in JOBS],
        "figures": figures,
    }, indent=1, sort_keys=True) + "\n")
    print(f"{len(figures)} figures written to {SHIPPED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
