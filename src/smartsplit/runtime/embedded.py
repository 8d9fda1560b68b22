"""The embedded runtime: one process, deterministic for a seed; results written as they are produced."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from smartsplit.config import Config
from smartsplit.engine.experiment import Experiment


def summarise(config: Config, records: list[dict], num_devices: int, wall_s: float) -> dict:
    peaks = [p for r in records for p in r["peak_measured_mb"]]
    latencies = [r["latency_s"] for r in records]
    return {
        "name": config.name,
        "strategy": config.strategy.name,
        "seed": config.seed,
        "rounds": len(records),
        "final_accuracy": records[-1]["accuracy"] if records else None,
        "best_accuracy": max((r["accuracy"] for r in records), default=None),
        "participation_rate": sum(1 - r["excluded"] / num_devices for r in records) / max(len(records), 1),
        "mean_participants": sum(r["participants"] for r in records) / max(len(records), 1),
        "max_peak_measured_mb": max(peaks, default=0.0),
        "mean_round_latency_s": sum(latencies) / max(len(latencies), 1),
        "peak_round_latency_s": max(latencies, default=0.0),
        "simulated_time_s": sum(latencies),
        "oom_events": sum(r["oom_events"] for r in records),
        "wall_s": wall_s,
    }


def run_experiment(config: Config, run_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run every round of ``config``; write ``config.yaml``, ``metrics.jsonl`` (per round) and ``summary.json``."""
    run_dir = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    started = time.perf_counter()
    experiment = Experiment(config)
    records: list[dict] = []
    bar = tqdm(total=config.training.rounds, desc=config.name, unit="round", disable=not progress, leave=True)
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        for record in experiment.rounds():
            records.append(record)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(acc=f"{record['accuracy']:.3f}", sim=f"{sum(r['latency_s'] for r in records):.0f}s")
            bar.update()
    bar.close()
    summary = summarise(config, records, len(experiment.devices), time.perf_counter() - started)
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
