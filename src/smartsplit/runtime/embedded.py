"""The embedded runtime: one process, deterministic for a seed; results written as they are produced.

A run folder holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per round), ``decisions.jsonl``
(who trained, where each cut, and why), ``state.pt`` (everything needed to resume after the last finished
round) and, at the end, ``summary.json``. How folders are guarded and resumes checked: ``runtime.folder``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from smartsplit.config import Config, build_config
from smartsplit.engine.experiment import Experiment
from smartsplit.errors import SmartSplitError
from smartsplit.runtime.folder import STATE_FORMAT, RunLock, check_run_folder, clear_run, fingerprint, load_state


def summarise(config: Config, records: list[dict], num_devices: int, wall_s: float, target: float | None = None) -> dict:
    reached = next((r for r in records if target is not None and r["accuracy"] >= target), None)
    peaks = [p for r in records for p in r["peak_measured_mb"] if p is not None]
    latencies = [r["latency_s"] for r in records]
    n = max(len(records), 1)
    return {
        "name": config.name,
        "strategy": config.strategy.name,
        "seed": config.seed,
        "rounds": len(records),
        "final_accuracy": records[-1]["accuracy"] if records else None,
        "best_accuracy": max((r["accuracy"] for r in records), default=None),
        "participation_rate": sum(1 - (r["excluded"] + r.get("offline", 0)) / num_devices for r in records) / n,
        "mean_participants": sum(r["participants"] for r in records) / n,
        "max_peak_measured_mb": max(peaks, default=0.0),
        "mean_round_latency_s": sum(latencies) / max(len(latencies), 1),
        "peak_round_latency_s": max(latencies, default=0.0),
        "simulated_time_s": sum(latencies),
        "oom_events": sum(r["oom_events"] for r in records),
        "pauses": sum(r.get("pauses", 0) for r in records),
        "dropouts": sum(r.get("dropouts", 0) for r in records),
        "cut_moves": sum(r.get("cut_moves", 0) for r in records),
        "replans": sum(r.get("replans", 0) for r in records),
        "recompute_pct": sum(r.get("recompute_pct", 0.0) for r in records) / n,
        "target_accuracy": target,
        "to_target": {"round": reached["round"], "clock_s": reached["clock_s"]} if reached else None,
        "wall_s": wall_s,
    }


def _read_records(path: Path, limit: int | None) -> list[dict]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines()[:limit] if line.strip()]
    except (ValueError, UnicodeDecodeError):
        raise SmartSplitError(f"{path}: not a metrics file SmartSplit wrote (a line is not JSON); "
                              "start the run again with --overwrite") from None


def _rewrite(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The config of the run in ``run_dir``; ``overrides`` may only extend ``training.rounds``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise SmartSplitError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    others = [o for o in overrides if o.partition("=")[0].strip() != "training.rounds"]
    if others:
        raise SmartSplitError(f"--resume: only training.rounds may change on resume (--set training.rounds=N to "
                              f"extend the run); got --set {others[0]}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SmartSplitError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SmartSplitError(f"{path}: not a run's config (expected a mapping of sections)")
    return build_config(raw, overrides, source=str(path))


def run_experiment(config: Config, run_dir: str | Path | None = None, progress: bool = True, resume: bool = False,
                   overwrite: bool = False) -> dict:
    """Run ``config`` round by round, writing every result as soon as it exists.

    The run folder (default ``<output_dir>/<name>``) must not hold a run already, unless ``overwrite`` (its run
    files are replaced) or ``resume``: then the run continues after its last saved round, and its metrics match
    those of a run that was never interrupted.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name
    check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with RunLock(run_dir):  # check_run_folder made the folder
            if overwrite and not resume:
                clear_run(run_dir)
            return _run(config, run_dir, progress, resume)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, run_dir: Path, progress: bool, resume: bool) -> dict:
    started = time.perf_counter()
    metrics_path, decisions_path, state_path = run_dir / "metrics.jsonl", run_dir / "decisions.jsonl", run_dir / "state.pt"
    written = _read_records(metrics_path, None)
    state = load_state(run_dir, config, len(written)) if resume else None
    experiment = Experiment(config)
    try:
        start = experiment.load_state_dict(state) if state is not None else 0
        records = written[:start]
        # rounds after the saved state (if the run died between writing them and saving) are run again
        _rewrite(metrics_path, records)
        _rewrite(decisions_path, _read_records(decisions_path, start))
        (run_dir / "config.yaml").write_text(config.to_yaml())
        started_as = fingerprint(config)

        bar = tqdm(total=config.training.rounds, initial=start, desc=config.name, unit="round", disable=not progress)
        with open(metrics_path, "a") as metrics, open(decisions_path, "a") as decisions:
            for record in experiment.rounds(start):
                decisions.write(json.dumps(record.pop("decision")) + "\n")
                decisions.flush()
                records.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                tmp = state_path.with_suffix(".tmp")
                torch.save({"format": STATE_FORMAT, "config": started_as, **experiment.state_dict(record["round"])}, tmp)
                os.replace(tmp, state_path)
                bar.set_postfix(acc=f"{record['accuracy']:.3f}", sim=f"{record['clock_s']:.0f}s")
                bar.update()
        bar.close()
    finally:
        experiment.close()
    summary = summarise(config, records, len(experiment.devices), time.perf_counter() - started, config.target_accuracy)
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
