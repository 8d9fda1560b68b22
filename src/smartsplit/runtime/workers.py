"""A round's independent parts trained at once, in worker processes, with the sequential engine's results.

What a round's devices share decides what may run apart. Devices attached to one edge server share its queue
(simulated waiting times) and, with a shared server-side copy, its weights: they are simulated together, in
one part, so the edge still sees their steps in simulated arrival order. A device that trains its whole model
and may not move its cut (FedAvg) never touches its edge: it can train anywhere. Edge servers share nothing
(the clock of each is its own). With ``edge_order: sequential`` every device waits for the previous one,
across edges: the round is one part. Aggregation takes each edge's updates in device-id order
(``engine.round.assemble``), so the parts assemble into the outcome one simulation of them all would give,
bit for bit.

Each worker holds a replica of the experiment's roles (data, fleet, shards, traces, on-device managers),
built from the same config and seed, so a round's message to it is only the instructions of its part; the
global model's weights travel in the instructions as they do to real devices. ``ProcessRounds`` runs the
workers as local processes, this one among them (its own experiment trains one part of each round);
``smartsplit.runtime.cluster`` runs the same replicas as Ray actors.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable

import torch

from smartsplit.config import Config
from smartsplit.engine.round import RoundOutcome, RoundParts, assemble
from smartsplit.errors import SmartSplitError
from smartsplit.kernels.step import start_optimizers
from smartsplit.runtime.allocator import freeze_collector, tune_allocator
from smartsplit.runtime.packing import pack, unpack
from smartsplit.runtime.pool import WorkerPool, default_workers
from smartsplit.roles.central import Evaluation, batch_scores, summarise_scores
from smartsplit.messages import EdgeInstructions, RoundInstructions
from smartsplit.strategies.base import StepObserver



@dataclass(frozen=True)
class Part:
    """Devices simulated together in one worker, and the edge servers they train through."""

    instructions: tuple[RoundInstructions, ...]
    edges: tuple[int, ...]
    load: float  # relative cost, to balance the workers


def split_round(experiment, device_instructions: list[RoundInstructions], workers: int) -> list[Part]:
    """At most ``workers`` parts of the round that share nothing, balanced by local steps (largest first onto
    the least loaded worker)."""
    x = experiment
    if not device_instructions:
        return []
    steps = {i.device_id: max(x.local_steps[i.device_id], 1) for i in device_instructions}
    atoms: list[list[RoundInstructions]] = []
    if x.strategy.execution.edge_order == "sequential":
        atoms.append(list(device_instructions))
    else:
        by_edge: dict[int, list[RoundInstructions]] = {}
        for i in device_instructions:
            alone = i.cut == x.num_units and not i.move_cut
            if alone:
                atoms.append([i])
            else:
                by_edge.setdefault(x.central.edge_of(i.device_id), []).append(i)
        atoms += [by_edge[e] for e in sorted(by_edge)]
    atoms.sort(key=lambda a: (-sum(steps[i.device_id] for i in a), a[0].device_id))
    bins: list[list[RoundInstructions]] = [[] for _ in range(min(workers, len(atoms)))]
    loads = [0.0] * len(bins)
    for atom in atoms:
        b = loads.index(min(loads))
        bins[b] += atom
        loads[b] += sum(steps[i.device_id] for i in atom)
    order = {i.device_id: n for n, i in enumerate(device_instructions)}  # the sequential engine's process order
    parts = []
    for b, members in enumerate(bins):
        members.sort(key=lambda i: order[i.device_id])
        edges = tuple(sorted({x.central.edge_of(i.device_id) for i in members}))
        parts.append(Part(tuple(members), edges, loads[b]))
    return parts


class Replica:
    """A worker's copy of the experiment's roles; trains the parts of rounds it is handed."""

    def __init__(self, config: Config, strategy_blob: bytes | None) -> None:
        from smartsplit.engine.experiment import Experiment

        torch.set_num_threads(config.threads)
        tune_allocator()
        strategy = pickle.loads(strategy_blob) if strategy_blob is not None else None
        self.experiment = Experiment(config, strategy)
        start_optimizers(config.training.optimizer)
        freeze_collector()  # for the worker's life

    def train(self, part: Part, edge_instructions: list[EdgeInstructions], clock_s: float,
              observer: StepObserver | None) -> tuple[RoundParts, dict]:
        """The part's results, and which memory figures this replica's meter has given so far (the run's
        summary counts the figures every process planned from)."""
        self.experiment.clock_s = clock_s
        parts = self.experiment.train_part(part.instructions, edge_instructions, part.edges, observer)
        meter = self.experiment.meter
        return parts, dict(meter.sources) if meter is not None else {}

    def score(self, state: dict, batch_size: int, first: int, last: int) -> list[tuple[float, int]]:
        """The global model ``state``'s scores on test batches ``first..last-1`` (this replica's own test set)."""
        model = self.experiment.central.model
        model.load_state_dict(state)
        return batch_scores(model, self.experiment.test, batch_size, first, last)

    def close(self) -> None:
        self.experiment.close()


def strategy_blob(strategy) -> bytes | None:
    """The strategy, pickled for the workers (None: they build the config's own)."""
    if strategy is None:
        return None
    try:
        return pickle.dumps(strategy)
    except Exception as exc:
        raise SmartSplitError(f"engine: the strategy {type(strategy).__name__} cannot be sent to worker processes "
                              f"({type(exc).__name__}: {exc}); define it in an importable module, or run with "
                              "engine: sequential") from None


def batch_ranges(examples: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """The test set's batches in ``workers`` contiguous runs, as (first, last) batch indices."""
    count = -(-examples // batch_size)
    bounds = [count * w // workers for w in range(workers + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class WorkerRounds:
    """A ``RoundExecutor`` over workers that each hold a ``Replica``: a round's independent parts train on them
    at once, and the test set's batches are scored on them at once. Subclasses say how a call reaches the
    workers (``_on_workers``)."""

    workers: int
    single_part_here = True  # a round of one part trains in this process, without the round trip

    def _on_workers(self, method: str, calls: list[tuple], here: Callable[..., Any]) -> list:
        """``Replica.<method>(*args)`` for each ``args`` in ``calls``, at most one per worker at a time, in order;
        ``here(*args)`` does the same in this process, for executors that count it as one of their workers."""
        raise NotImplementedError

    def __call__(self, experiment, device_instructions: list[RoundInstructions],
                 edge_instructions: list[EdgeInstructions], observer: StepObserver | None) -> RoundOutcome:
        parts = split_round(experiment, device_instructions, self.workers)
        if len(parts) <= 1 and self.single_part_here:
            return experiment.train_here(device_instructions, edge_instructions, observer)
        calls = [(part, edge_instructions, experiment.clock_s, observer) for part in parts]

        def here(part: Part, edge_instructions, clock_s, observer) -> tuple[RoundParts, dict]:
            return experiment.train_part(part.instructions, edge_instructions, part.edges, observer), {}

        trained = self._on_workers("train", calls, here)
        if experiment.meter is not None:
            for _, sources in trained:
                experiment.meter.sources.update(sources)
        return assemble([part for part, _ in trained], len(experiment.edge_specs))

    def evaluate(self, model, test, batch_size: int) -> Evaluation:
        """``roles.central.evaluate``'s figures, the batches scored in the workers at once."""
        state = self._shared(model.state_dict())
        ranges = batch_ranges(len(test), batch_size, self.workers)
        scores = self._on_workers("score", [(state, batch_size, a, b) for a, b in ranges],
                                  lambda state, batch_size, a, b: batch_scores(model, test, batch_size, a, b))
        return summarise_scores([s for part in scores for s in part], len(test))

    def _shared(self, value):
        """``value`` as the workers should receive it when every call gets it (Ray stores it once)."""
        return value


class ProcessRounds(WorkerRounds):
    """Trains each round's independent parts in ``workers`` local processes: this one, which trains a part itself
    while it waits for the others, and ``workers - 1`` spawned ones (``pool``: already started, for this config
    and strategy, by ``WorkerPool.for_run``)."""

    def __init__(self, config: Config, strategy=None, workers: int | None = None, pool: WorkerPool | None = None) -> None:
        self.workers = workers or default_workers(config.threads)
        blob = strategy_blob(strategy)
        if pool is not None and (pool.processes, pool.config_json, pool.strategy_blob) != (
                self.workers - 1, config.model_dump_json(), blob):
            raise ValueError("ProcessRounds: the pool was started for another config, strategy or worker count")
        self._pool = pool or (WorkerPool(config, self.workers - 1, blob) if self.workers > 1 else None)

    def _on_workers(self, method: str, calls: list[tuple], here: Callable[..., Any]) -> list:
        if not calls:
            return []
        futures = [self._pool.submit(method, pack(args)) for args in calls[1:]]
        try:
            return [here(*calls[0])] + [unpack(f.result()) for f in futures]
        except BrokenProcessPool:
            raise SmartSplitError(
                "engine: parallel: a worker process died (its error is above). A script that runs experiments with "
                "engine: parallel must start them under `if __name__ == \"__main__\":` (workers are spawned and "
                "import the script); else run with engine: sequential") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
