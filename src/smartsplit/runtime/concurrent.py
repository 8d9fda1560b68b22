"""Several runs at once, one process each (results identical to running them one by one)."""

from __future__ import annotations

import logging
import os
import time
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from smartsplit.config import Config
from smartsplit.reports.summary import RunSummary
from smartsplit.strategies.registry import TRAIN_APART


def _run_one(config_json: str, overwrite: bool, log_level: int) -> RunSummary:
    from smartsplit.runtime.embedded import run_experiment

    logger = logging.getLogger("smartsplit")  # a spawned worker: messages as the parent's settings want them
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(log_level)

    return run_experiment(Config.model_validate_json(config_json), progress=False, overwrite=overwrite)


def _rounds_written(configs: list[Config], since: float) -> int:
    """Rounds in the runs' metrics files written since ``since`` (an earlier run's file, not yet replaced, is not
    counted)."""
    total = 0
    for c in configs:
        path = Path(c.output_dir) / c.name / "metrics.jsonl"
        try:
            if path.stat().st_mtime >= since:
                total += path.read_bytes().count(b"\n")
        except OSError:
            pass
    return total


def run_many(
    configs: list[Config], workers: int | None = None, on_done: Callable[[RunSummary], None] | None = None, progress: bool = False,
    overwrite: bool = False,
) -> list[RunSummary]:
    """Run ``configs`` on ``workers`` cores (default: one per core), each in its own process; summaries in the
    order given.

    Runs whose rounds must be simulated in one piece (devices sharing an edge server) start first. Runs whose
    devices all train apart (``TRAIN_APART``: the whole model on the device) start last and, when there are
    fewer of them than cores, each with the parallel engine on all the cores: the cores a finished run leaves
    idle while the last ones run are used, at the cost of sharing them for a while. Results are the same on
    every engine, so the schedule changes only the wall time.

    ``overwrite``: replace runs already in their folders (else such a folder is refused).
    With ``progress``, one bar counts the rounds all runs have written so far (read from their metrics files).
    """
    if configs and configs[0].engine == "ray":
        from smartsplit.runtime.cluster import run_on_ray

        return run_on_ray(configs, overwrite, configs[0].ray_address, on_done)
    cores = max(1, workers or os.cpu_count() or 1)
    results: list[RunSummary | None] = [None] * len(configs)
    apart = {i for i, c in enumerate(configs) if c.strategy.name in TRAIN_APART}
    spread = len(apart) < cores
    runs = []
    for i, c in sorted(enumerate(configs), key=lambda run: run[0] in apart):
        engine = {"engine": "parallel", "workers": cores // c.threads} if spread and i in apart and cores // c.threads > 1 \
            else {"engine": "sequential"} if cores > 1 and len(configs) > 1 else {}
        runs.append((i, c.model_copy(update=engine)))
    if cores == 1 or len(configs) == 1:
        return _one_by_one(runs, results, on_done, progress, overwrite)
    _in_processes(runs, results, min(cores, len(configs)), on_done, progress, overwrite)
    return results  # type: ignore[return-value]


def _one_by_one(runs: list[tuple[int, Config]], results: list, on_done, progress: bool, overwrite: bool) -> list:
    from smartsplit.runtime.embedded import run_experiment

    for i, config in runs:
        results[i] = run_experiment(config, progress=progress, overwrite=overwrite)
        if on_done:
            on_done(results[i])
    return results


def _in_processes(runs: list[tuple[int, Config]], results: list, workers: int, on_done, progress: bool,
                  overwrite: bool) -> None:
    """``runs`` in ``workers`` processes, each result into ``results`` at its index as it ends."""
    configs = [c for _, c in runs]
    total = sum(c.training.rounds for c in configs)
    started = time.time()
    # A terminated or interrupted compare takes its workers with it: none may go on writing into run folders.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(runs)), mp_context=get_context("spawn"))
    try:
        with tqdm(total=total, desc=f"{len(configs)} runs", unit="round", disable=not progress) as bar:
            level = logging.getLogger("smartsplit").getEffectiveLevel()
            level = level if level <= logging.DEBUG else logging.WARNING  # workers' progress lines only when verbose
            futures = {pool.submit(_run_one, c.model_dump_json(), overwrite, level): i for i, c in runs}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                bar.update(min(total, _rounds_written(configs, started)) - bar.n)
                for future in finished:
                    results[futures[future]] = future.result()
                    if on_done:
                        with tqdm.external_write_mode():
                            on_done(results[futures[future]])
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
