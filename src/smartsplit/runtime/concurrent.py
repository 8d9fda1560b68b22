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
    """Run ``configs`` in ``workers`` processes (default: one per core); summaries in the order given.

    ``overwrite``: replace runs already in their folders (else such a folder is refused).
    With ``progress``, one bar counts the rounds all runs have written so far (read from their metrics files).
    """
    if configs and configs[0].engine == "ray":
        from smartsplit.runtime.cluster import run_on_ray

        return run_on_ray(configs, overwrite, configs[0].ray_address, on_done)
    workers = max(1, min(workers or os.cpu_count() or 1, len(configs)))
    if workers > 1:  # the runs fill the cores: each trains its rounds in its own process
        configs = [c.model_copy(update={"engine": "sequential"}) for c in configs]
    if workers == 1:
        from smartsplit.runtime.embedded import run_experiment

        results = []
        for config in configs:
            results.append(run_experiment(config, progress=progress, overwrite=overwrite))
            if on_done:
                on_done(results[-1])
        return results
    results: list[RunSummary | None] = [None] * len(configs)
    total = sum(c.training.rounds for c in configs)
    started = time.time()
    # A terminated or interrupted compare takes its workers with it: none may go on writing into run folders.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        with tqdm(total=total, desc=f"{len(configs)} runs", unit="round", disable=not progress) as bar:
            level = logging.getLogger("smartsplit").getEffectiveLevel()
            level = level if level <= logging.DEBUG else logging.WARNING  # workers' progress lines only when verbose
            futures = {pool.submit(_run_one, c.model_dump_json(), overwrite, level): i for i, c in enumerate(configs)}
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
    return results  # type: ignore[return-value]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
