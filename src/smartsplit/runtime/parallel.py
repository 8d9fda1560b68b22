"""Several runs at once, one process each (results identical to running them one by one)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable

from smartsplit.config import Config


def _run_one(config_json: str, threads: int) -> dict:
    import torch

    from smartsplit.config import Config
    from smartsplit.runtime.embedded import run_experiment

    torch.set_num_threads(threads)
    return run_experiment(Config.model_validate_json(config_json), progress=False)


def run_many(configs: list[Config], workers: int | None = None, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``configs`` in ``workers`` processes (default: one per core); summaries in the order given."""
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(configs)))
    threads = max(1, cores // workers)
    if workers == 1:
        results = [_run_one(c.model_dump_json(), threads) for c in configs]
        for r in results if on_done else []:
            on_done(r)
        return results
    results: list[dict | None] = [None] * len(configs)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, c.model_dump_json(), threads): i for i, c in enumerate(configs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if on_done:
                on_done(results[futures[future]])
    return results  # type: ignore[return-value]
