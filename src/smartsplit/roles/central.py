"""The central role: the global model, the strategy that picks who trains where, aggregation and evaluation.

Each round it asks the strategy for a plan over the round's candidates, turns it into ``RoundInstructions``
for each chosen device and ``EdgeInstructions`` for each edge server, and at the round's end aggregates the
``Update``s (devices and edge copies, merged per edge server, then across edges), lets the strategy learn from
the devices' reports and step observations, and evaluates the new global model on the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smartsplit.data import Dataset
from smartsplit.kernels.aggregate import aggregate, merge, unit_states
from smartsplit.messages import DeviceResult, EdgeInstructions, RoundInstructions, Update
from smartsplit.strategies.base import Candidate, RoundPlan, StepObserver, Strategy, check_plan


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float


def evaluate(units: nn.Sequential, data: Dataset, batch_size: int) -> Evaluation:
    return summarise_scores(batch_scores(units, data, batch_size), len(data))


def batch_scores(units: nn.Sequential, data: Dataset, batch_size: int, first: int = 0,
                 last: int | None = None) -> list[tuple[float, int]]:
    """(summed loss, correct) of test batches ``first..last-1``: batches scored apart (in other processes) and
    summarised in order give ``evaluate``'s figures exactly."""
    scores = []
    count = -(-len(data) // batch_size)
    with torch.no_grad():
        for batch in range(first, count if last is None else last):
            start = batch * batch_size
            x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
            logits = units(x)
            scores.append((F.cross_entropy(logits, y, reduction="sum").item(), int((logits.argmax(1) == y).sum().item())))
    return scores


def summarise_scores(scores: list[tuple[float, int]], examples: int) -> Evaluation:
    correct, loss_sum = 0, 0.0
    for loss, hits in scores:
        loss_sum += loss
        correct += hits
    return Evaluation(accuracy=correct / examples, loss=loss_sum / examples)


class CentralRole:
    """The central server. ``edge_of(device_id)`` says which edge server a device trains through."""

    def __init__(self, model: nn.Sequential, strategy: Strategy, test: Dataset, eval_batch_size: int, seed: int,
                 num_edges: int) -> None:
        self.model = model
        self.strategy = strategy
        self.test = test
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_edges = num_edges
        self.rng = np.random.default_rng(seed)
        self._observer: StepObserver | None = None  # the one handed out for the round under way
        self.evaluator = evaluate  # (model, test set, batch size) -> Evaluation; an engine may score in parallel

    def edge_of(self, device_id):
        """The edge server of ``device_id`` (an int, or an array of them: an array of edges)."""
        return device_id % self.num_edges

    def step_observer(self) -> StepObserver | None:
        """The strategy's observer for this round's steps (the roles holding units run it)."""
        self._observer = self.strategy.step_observer()
        return self._observer

    def plan_round(self, rnd: int, candidates: Sequence[Candidate], k: int) -> RoundPlan:
        """The strategy's plan for the round, checked (``check_plan``) before anything acts on it."""
        plan = self.strategy.configure_round(rnd, candidates, k, self.rng)
        return check_plan(plan, candidates, len(self.model), self.strategy.name)

    def instructions(self, rnd: int, plan: RoundPlan, start_s: float) -> tuple[list[RoundInstructions], list[EdgeInstructions]]:
        """What each chosen device and each edge server needs to run the round."""
        rules = self.strategy.rules
        devices = [
            RoundInstructions(
                round=rnd, device_id=a.device_id, cut=a.cut, weights=unit_states(self.model, 1, a.cut),
                checkpointing=rules.checkpointing, replan=rules.replan, move_cut=rules.move_cut,
                batch_seed=(self.seed, rnd, a.device_id), start_s=start_s,
            )
            for a in plan.assignments
        ]
        edge_instructions = [
            EdgeInstructions(
                round=rnd, weights=unit_states(self.model, 1, len(self.model)),
                cuts={a.device_id: a.cut for a in plan.assignments if self.edge_of(a.device_id) == e},
                copies=self.strategy.execution.edge_copies,
            )
            for e in range(self.num_edges)
        ]
        return devices, edge_instructions

    def finish_round(self, rnd: int, edge_updates: list[list[Update]], results: Sequence[DeviceResult],
                     evaluate_now: bool = True) -> Evaluation | None:
        """Aggregate (devices and edge copies merged per edge server, then across edges), let the strategy
        learn from the reports and observations, and evaluate the new global model (unless not ``evaluate_now``)."""
        aggregate(self.model, [merge(group) for group in edge_updates if group])
        observations = {r.report.device: r.observations for r in results if r.observations}
        self.strategy.round_finished(rnd, [r.report for r in results],
                                     observations if self._observer is not None else None)
        return self.evaluator(self.model, self.test, self.eval_batch_size) if evaluate_now else None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "rng": self.rng.bit_generator.state,
                "strategy": _storable(self.strategy.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.rng.bit_generator.state = state["rng"]
        self.strategy.load_state_dict(_restored(state["strategy"]))


_NUMPY = "__numpy__"


def _storable(value):
    """A strategy's state in the form a run's state file keeps (plain data and tensors only): numpy arrays become
    tagged tensors and numpy scalars Python numbers, restored by ``_restored``."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {_NUMPY: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_storable(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _restored(value):
    if isinstance(value, dict):
        if set(value) == {_NUMPY}:
            return value[_NUMPY].numpy()
        return {k: _restored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_restored(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value
