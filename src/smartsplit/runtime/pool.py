"""``engine: parallel``'s worker processes, which a run starts before this process imports torch.

A spawned worker spends its first seconds importing torch and building its replica of the experiment. Started
as the first thing a run does (``smartsplit run`` starts them once it has read the config and checked the run
folder), that happens while this process imports torch and builds its own experiment, instead of in round 1.
So this module imports nothing heavy: a worker imports its replica (``runtime.workers``) itself.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context

from smartsplit.config import Config


def default_workers(threads: int) -> int:
    """One worker per ``threads`` cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(threads, 1))


_replica = None  # the worker process's own ``runtime.workers.Replica`` (set by its initializer)


def _start_worker(config_json: str, strategy_blob: bytes | None) -> None:
    global _replica
    from smartsplit.runtime.workers import Replica

    _replica = Replica(Config.model_validate_json(config_json), strategy_blob)


def _call_replica(method: str, args):
    """``Replica.<method>(*args)`` in a worker process: the arguments and the result cross packed
    (``runtime.packing``)."""
    from smartsplit.runtime.packing import pack, unpack

    return pack(getattr(_replica, method)(*unpack(args)))


class WorkerPool:
    """``processes`` spawned processes, each with a replica of ``config``'s experiment, started now."""

    def __init__(self, config: Config, processes: int, strategy_blob: bytes | None = None) -> None:
        self.config_json = config.model_dump_json()
        self.strategy_blob = strategy_blob
        self.processes = processes
        self._executor = ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.config_json, strategy_blob))
        for _ in range(processes):  # the executor starts a process per call waiting: start them all now
            self._executor.submit(int)

    @classmethod
    def for_run(cls, config: Config) -> WorkerPool | None:
        """The spawned processes ``config``'s parallel engine trains with (it trains in this process too), or
        None when it needs none (another engine, or one worker)."""
        workers = config.workers or default_workers(config.threads)
        return cls(config, workers - 1) if config.engine == "parallel" and workers > 1 else None

    def submit(self, method: str, packed_args) -> Future:
        """``Replica.<method>(*args)`` on a free worker; its future gives the packed result."""
        return self._executor.submit(_call_replica, method, packed_args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
