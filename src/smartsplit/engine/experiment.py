"""An experiment: data, fleet, model and strategy from a config, run round by round."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smartsplit.config import Config
from smartsplit.data import Dataset, load_dataset, partition, synthetic
from smartsplit.engine.aggregate import aggregate
from smartsplit.engine.clock import EdgeSpec, model_transfer_s, step_times
from smartsplit.engine.round import MB, OptimizerSpec, Participant, run_round
from smartsplit.errors import SmartSplitError
from smartsplit.fleet import Device, fleet_from_csv, load_catalog, sample_fleet
from smartsplit.memory.model import device_memory, optimizer_slots
from smartsplit.models.profile import ModelProfile, ProfileCache
from smartsplit.models.zoo import build_model
from smartsplit.strategies import make_strategy
from smartsplit.strategy import Candidate, Strategy


@dataclass
class Evaluation:
    accuracy: float
    loss: float


def evaluate(units: nn.Sequential, data: Dataset, batch_size: int) -> Evaluation:
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
            logits = units(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    return Evaluation(accuracy=correct / len(data), loss=loss_sum / len(data))


def load_data(config: Config) -> tuple[Dataset, Dataset]:
    d = config.data
    if d.dataset == "synthetic":
        return (
            synthetic(d.synthetic_shape, d.synthetic_classes, d.synthetic_train, config.seed, split="train"),
            synthetic(d.synthetic_shape, d.synthetic_classes, d.synthetic_test, config.seed, split="test"),
        )
    return (
        load_dataset(d.dataset, "train", d.root, limit=d.train_limit, seed=config.seed),
        load_dataset(d.dataset, "test", d.root, limit=d.test_limit, seed=config.seed),
    )


def build_fleet(config: Config) -> list[Device]:
    f = config.fleet
    if f.csv is not None:
        devices = fleet_from_csv(f.csv)
        if len(devices) != f.devices:
            raise SmartSplitError(f"fleet.csv: {f.csv} lists {len(devices)} devices but fleet.devices is {f.devices}")
        return devices
    return sample_fleet(f.devices, f.classes, seed=config.seed, catalog=load_catalog(f.catalog), jitter=f.jitter)


def local_batches(indices: np.ndarray, batch_size: int, steps: int | None, epochs: float | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Sample indices of each local step: reshuffled passes over the device's data."""
    total = steps if steps is not None else max(1, math.ceil(epochs * len(indices) / batch_size))
    batches: list[np.ndarray] = []
    order = np.empty(0, dtype=np.int64)
    while len(batches) < total:
        if len(order) == 0:
            order = rng.permutation(indices)
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


class Experiment:
    """Everything one run needs, built from a config and a seed; ``rounds()`` yields one record per round."""

    def __init__(self, config: Config, strategy: Strategy | None = None) -> None:
        self.config = config
        self.train, self.test = load_data(config)
        self.model = build_model(
            config.model.name,
            in_channels=self.train.shape[0],
            num_classes=self.train.num_classes,
            width=config.model.width,
            input_size=self.train.shape[1],
            seed=config.seed,
        )
        self.num_units = len(self.model)
        self.strategy = strategy or make_strategy(config.strategy, self.num_units)
        self.devices = build_fleet(config)
        self.shards = partition(
            self.train.y.numpy(),
            len(self.devices),
            config.data.partition,
            alpha=config.data.alpha,
            shards_per_client=config.data.shards_per_client,
            seed=config.seed,
        )
        t = config.training
        self.optimizer = OptimizerSpec(t.optimizer, t.lr, t.momentum, optimizer_slots(t.optimizer, t.momentum))
        self.edge = EdgeSpec(config.edge.gflops * 1e9, config.edge.latency_s)
        self.profiles = ProfileCache()
        self.rng = np.random.default_rng(config.seed)

    @property
    def profile(self) -> ModelProfile:
        return self.profiles.get(self.config.model.name, self.model, self.train.shape, self.config.training.batch_size)

    def candidates(self) -> list[Candidate]:
        profile = self.profile
        peaks = tuple(device_memory(profile, c, slots=self.optimizer.slots).total for c in range(1, self.num_units + 1))
        out = []
        for device in self.devices:
            times = tuple(
                step_times(profile, c, device, self.edge).total for c in range(1, self.num_units + 1)
            )
            out.append(Candidate(device=device, budget=device.memory_bytes, peaks=peaks, step_times=times))
        return out

    def run_round(self, rnd: int) -> dict:
        started = time.perf_counter()
        t = self.config.training
        plan = self.strategy.configure_round(rnd, self.candidates(), t.devices_per_round, self.rng)
        by_id = {d.id: d for d in self.devices}
        participants = [
            Participant(
                device=by_id[a.device_id],
                cut=a.cut,
                budget=by_id[a.device_id].memory_bytes,
                batches=local_batches(
                    self.shards[a.device_id], t.batch_size, t.local_steps, t.local_epochs,
                    np.random.default_rng([self.config.seed, rnd, a.device_id]),
                ),
            )
            for a in plan.assignments
        ]
        contributions, reports = run_round(self.model, participants, self.train, self.profile, self.edge, self.optimizer)
        aggregate(self.model, contributions)
        self.strategy.round_finished(rnd, reports)
        evaluation = evaluate(self.model, self.test, t.eval_batch_size)
        return {
            "round": rnd + 1,
            "accuracy": evaluation.accuracy,
            "loss": evaluation.loss,
            "participants": len(participants),
            "excluded": plan.excluded,
            "cuts": [r["cut"] for r in reports],
            "oom_events": sum(r["oom_events"] for r in reports),
            "peak_predicted_mb": [r["peak_predicted_mb"] for r in reports],
            "peak_measured_mb": [r["peak_measured_mb"] for r in reports],
            "bytes_up": sum(r["bytes_up"] for r in reports),
            "bytes_down": sum(r["bytes_down"] for r in reports),
            "latency_s": max((r["finish_s"] for r in reports), default=0.0),
            "wall_s": time.perf_counter() - started,
            "devices": reports,
        }

    def rounds(self) -> Iterator[dict]:
        for rnd in range(self.config.training.rounds):
            yield self.run_round(rnd)
