"""A run killed after round 2 and resumed gives the metrics of a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = {
    "name": "resume",
    "data": {"dataset": "synthetic", "synthetic_train": 400, "synthetic_test": 100},
    "model": {"name": "cnn", "width": 0.5},
    "fleet": {"devices": 6, "classes": {"mcu-psram": 0.5, "wearable": 0.5},
              "budgets": {"kind": "foreground", "mean_gap_s": 10, "mean_hold_s": 10, "horizon_s": 5000}},
    "training": {"rounds": 6, "devices_per_round": 3, "local_steps": 6, "batch_size": 16},
}


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "smartsplit.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_s")
        out.append(record)
    return out


def test_killed_run_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    whole, broken = tmp_path / "whole", tmp_path / "broken"

    reference = cli("run", str(config), "--quiet", "--out", str(whole))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    victim = cli("run", str(config), "--quiet", "--out", str(broken))
    metrics = broken / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            victim.send_signal(signal.SIGKILL)  # no chance to clean up, as in a crash
            break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = metrics.read_text().count("\n")
    assert 2 <= done < CONFIG["training"]["rounds"]

    resumed = cli("run", "--resume", str(broken), "--quiet")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert records(broken) == records(whole)
    decisions = (broken / "decisions.jsonl").read_text().splitlines()
    assert len(decisions) == CONFIG["training"]["rounds"]
