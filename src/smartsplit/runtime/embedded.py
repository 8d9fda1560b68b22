"""The embedded runtime: one process, deterministic for a seed; results written as they are produced.

A run folder holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per round), ``decisions.jsonl``
(who trained, where each cut, and why), ``state.pt`` (everything needed to resume after the last finished
round) and, at the end, ``summary.json``. How folders are guarded and resumes checked: ``runtime.folder``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm import tqdm

from smartsplit.config import Config, build_config
from smartsplit.engine.build import profile_sources
from smartsplit.engine.experiment import Experiment, RoundExecutor
from smartsplit.errors import SmartSplitError
from smartsplit.kernels.step import start_optimizers
from smartsplit.records import RoundRecord, strict_json
from smartsplit.reports.summary import RunSummary, profiles_line, summarise
from smartsplit.runtime.allocator import collector_frozen, tune_allocator
from smartsplit.runtime.folder import STATE_FORMAT, RunLock, check_run_folder, clear_run, fingerprint, load_state, run_folder
from smartsplit.runtime.pool import WorkerPool
from smartsplit.strategies import Strategy


log = logging.getLogger(__name__)


def _read_records(path: Path, limit: int | None) -> list[dict]:
    """The file's lines as records. A last line left half-written by a run killed while writing it is dropped
    (that round is run again on resume); any other line that is not JSON is refused."""
    if not path.exists():
        return []
    try:
        lines = [line for line in path.read_text().splitlines()[:limit] if line.strip()]
    except UnicodeDecodeError:
        lines = None
    records = []
    for number, line in enumerate(lines or [], start=1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not path.read_text().endswith("\n"):
                log.warning("%s: its last line was cut off mid-write; that round is run again", path)
                break
            lines = None
            break
    if lines is None:
        raise SmartSplitError(f"{path}: not a file SmartSplit wrote (a line is not JSON); start the run again with "
                              "--overwrite") from None
    return records


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _rewrite(path: Path, records: list[dict]) -> None:
    path.write_text("".join(strict_json(r) + "\n" for r in records))


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The config of the run in ``run_dir``; ``overrides`` may only extend ``training.rounds``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise SmartSplitError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    free = ("training.rounds", "engine", "workers", "ray_address")  # what does not change results
    others = [o for o in overrides if o.partition("=")[0].strip() not in free]
    if others:
        raise SmartSplitError(f"--resume: only training.rounds may change on resume (--set training.rounds=N to "
                              f"extend the run), and the engine (--engine, --workers); got --set {others[0]}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SmartSplitError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SmartSplitError(f"{path}: not a run's config (expected a mapping of sections)")
    return build_config(raw, overrides, source=str(path))


def start_engine(config: Config, strategy: Strategy | None = None, pool: WorkerPool | None = None):
    """The ``RoundExecutor`` of ``config.engine`` (None: sequential, in this process), started; close it after.
    ``pool``: the parallel engine's worker processes, already started (``WorkerPool.for_run``)."""
    if config.engine == "parallel":
        from smartsplit.runtime.workers import ProcessRounds

        return ProcessRounds(config, strategy, config.workers, pool)
    if config.engine == "ray":
        from smartsplit.runtime.cluster import RayRounds

        return RayRounds(config, strategy, config.workers)
    return None


def run_experiment(config: Config, run_dir: str | Path | None = None, progress: bool = True, resume: bool = False,
                   overwrite: bool = False, strategy: Strategy | None = None,
                   executor: RoundExecutor | None = None) -> RunSummary:
    """Run ``config`` round by round, writing every result as soon as it exists.

    The run folder (default ``<output_dir>/<name>``) must not hold a run already, unless ``overwrite`` (its run
    files are replaced) or ``resume``: then the run continues after its last saved round, and its metrics match
    those of a run that was never interrupted.
    """
    run_dir = run_folder(config, run_dir)
    check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    tune_allocator()
    try:
        with RunLock(run_dir):  # check_run_folder made the folder
            if overwrite and not resume:
                clear_run(run_dir)
            return _run(config, run_dir, progress, resume, strategy, executor)
    finally:
        torch.set_num_threads(threads)


def _state_saver(experiment: Experiment, state_path: Path, started_as: dict) -> Callable[[int], None]:
    """Saves what a resumed run needs, atomically, after a round's results are written."""

    def save(rounds_done: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"format": STATE_FORMAT, "config": started_as, **experiment.state_dict(rounds_done)}, tmp)
        os.replace(tmp, state_path)

    return save


def _play_rounds(experiment: Experiment, run_dir: Path, start: int, records: list[RoundRecord],
                 save: Callable[[int], None], progress: bool) -> None:
    """Rounds ``start + 1`` on, each written (decision, metrics, state) as soon as it ends."""
    config = experiment.config
    bar = tqdm(total=config.training.rounds, initial=start, desc=config.name, unit="round", disable=not progress)
    with open(run_dir / "metrics.jsonl", "a") as metrics, open(run_dir / "decisions.jsonl", "a") as decisions:
        for record in experiment.rounds(start):
            decisions.write(strict_json(record.decision) + "\n")
            decisions.flush()
            records.append(record)
            metrics.write(strict_json(record.to_json()) + "\n")
            metrics.flush()
            save(record.round)
            if record.accuracy is not None:
                bar.set_postfix(acc=f"{record.accuracy:.3f}", sim=f"{record.clock_s:.0f}s")
            log.debug("%s round %d: accuracy %s, loss %s, %d devices, cuts %s, latency %.1f s (simulated), "
                      "%d OOM, %d drop-outs, wall %.1f s", config.name, record.round, _figure(record.accuracy),
                      _figure(record.loss), record.participants, record.cuts, record.latency_s, record.oom_events,
                      record.dropouts, record.wall_s)
            bar.update()
    bar.close()


def _run(config: Config, run_dir: Path, progress: bool, resume: bool, strategy: Strategy | None,
         executor: RoundExecutor | None) -> RunSummary:
    started = time.perf_counter()
    metrics_path, decisions_path, state_path = run_dir / "metrics.jsonl", run_dir / "decisions.jsonl", run_dir / "state.pt"
    written = _read_records(metrics_path, None)
    state = load_state(run_dir, config, len(written)) if resume else None
    engine = executor or start_engine(config, strategy)
    try:
        experiment = Experiment(config, strategy, executor=engine)
        start_optimizers(config.training.optimizer)
    except BaseException:
        if engine is not executor:
            engine.close()
        raise
    try:
        with collector_frozen():  # the experiment's objects: a large fleet's are many
            start = experiment.load_state_dict(state) if state is not None else 0
            records = [RoundRecord.from_json(r) for r in written[:start]]
            # rounds after the saved state (if the run died between writing them and saving) are run again
            _rewrite(metrics_path, written[:start])
            _rewrite(decisions_path, _read_records(decisions_path, start))
            (run_dir / "config.yaml").write_text(config.to_yaml())
            started_as = fingerprint(config)

            log.info("%s: %s on %s, %d devices, rounds %d..%d, into %s", config.name, experiment.strategy.name,
                     config.model.name, len(experiment.devices), start + 1, config.training.rounds, run_dir)
            log.info("%s: %s", config.name, profiles_line([profile_sources(experiment.meter)]))

            save = _state_saver(experiment, state_path, started_as)
            if start == 0:
                save(0)  # a run killed while it writes its first round's results can still resume (from round 1)
            _play_rounds(experiment, run_dir, start, records, save, progress)
            torch.save(experiment.model.state_dict(), run_dir / "model.pt")  # the final global model, plain tensors
    finally:
        experiment.close()
        if engine is not executor:
            engine.close()
    summary = summarise(records, name=config.name, strategy=config.strategy.name, seed=config.seed,
                        fleet_size=len(experiment.devices), target=config.target_accuracy,
                        wall_s=time.perf_counter() - started, run_dir=str(run_dir),
                        profiles=profile_sources(experiment.meter), stopped=experiment.stopped,
                        grouping=experiment.grouping.record() if experiment.grouping is not None else None)
    (run_dir / "summary.json").write_text(strict_json(summary.to_json(), indent=2))
    return summary
