"""One federated round: the round's devices train against one shared edge, interleaved in simulated time.

Each device is a SimPy process. A split step runs for real at the simulated moment the edge serves it, so
the shared edge copy sees the devices' steps in order of simulated arrival, never one device's whole round
after another's (DESIGN 5). Device-side weights are private, so running the device's forward and backward
at that moment too changes nothing but keeps the whole step in one place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import simpy
import torch
from torch import nn

from smartsplit.data import Dataset
from smartsplit.engine.aggregate import Contribution, unit_states
from smartsplit.engine.clock import EdgeSpec, model_transfer_s, step_times
from smartsplit.engine.step import make_optimizer, split_step
from smartsplit.fleet import Device
from smartsplit.memory.measure import DeviceOutOfMemory, tensor_bytes
from smartsplit.memory.model import device_memory
from smartsplit.models.profile import ModelProfile

MB = 2**20


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    momentum: float
    slots: int  # optimizer state tensors per parameter


@dataclass
class Participant:
    device: Device
    cut: int
    budget: int
    batches: list[np.ndarray]  # sample indices of each local step


@dataclass
class _Tally:
    steps: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    comm_s: float = 0.0
    wait_s: float = 0.0
    finish_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    peak_measured: int = 0
    oom_events: int = 0


def _static_bytes(units: nn.Sequential, opt: torch.optim.Optimizer | None) -> int:
    """Weights, gradients and optimizer state, counted from the live tensors."""
    params = list(units.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    state = [t for s in (opt.state.values() if opt else []) for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return tensor_bytes(params) + tensor_bytes(grads) + tensor_bytes(state)


def run_round(
    global_units: nn.Sequential,
    participants: list[Participant],
    train: Dataset,
    profile: ModelProfile,
    edge: EdgeSpec,
    optimizer: OptimizerSpec,
) -> tuple[list[Contribution], list[dict]]:
    """Train every participant from ``global_units``; return the trained copies and a report per device."""
    num_units = len(global_units)
    env = simpy.Environment()
    edge_server = simpy.Resource(env, capacity=1)
    edge_units = copy.deepcopy(global_units)
    edge_opt = make_optimizer(list(edge_units.parameters()), optimizer.name, optimizer.lr, optimizer.momentum)
    edge_samples = {i: 0 for i in range(1, num_units + 1)}
    contributions: list[Contribution] = []
    reports: list[dict] = []

    def device_process(p: Participant):
        cut, dev = p.cut, p.device
        units = copy.deepcopy(global_units[:cut])
        opt = make_optimizer(list(units.parameters()), optimizer.name, optimizer.lr, optimizer.momentum)
        server_side = edge_units[cut:]
        predicted = device_memory(profile, cut, slots=optimizer.slots)
        tally = _Tally()
        down_s, up_s = model_transfer_s(profile, cut, dev, edge)
        yield env.timeout(down_s)
        tally.comm_s += down_s
        tally.bytes_down += profile.param_bytes(1, cut)

        for indices in p.batches:
            scale = len(indices) / profile.batch
            t = step_times(profile, cut, dev, edge, scale)
            yield env.timeout(t.forward_s)
            if cut < num_units:
                yield env.timeout(t.uplink_s)
                arrived = env.now
                with edge_server.request() as turn:
                    yield turn
                    tally.wait_s += env.now - arrived
                    result = _guarded_step(units, server_side, opt, edge_opt, train, indices, p.budget, predicted, tally)
                    yield env.timeout(t.edge_s)
                yield env.timeout(t.downlink_s)
            else:
                result = _guarded_step(units, server_side, opt, None, train, indices, p.budget, predicted, tally)
            if result is None:  # out of memory: the step is lost and the device stops for this round
                break
            yield env.timeout(t.backward_s)
            tally.compute_s += t.forward_s + t.backward_s
            tally.comm_s += t.uplink_s + t.downlink_s
            tally.bytes_up += result.cut_bytes
            tally.bytes_down += result.cut_bytes
            for unit in range(cut + 1, num_units + 1):
                edge_samples[unit] += result.samples

        if tally.steps:
            yield env.timeout(up_s)
            tally.comm_s += up_s
            tally.bytes_up += profile.param_bytes(1, cut)
            contributions.append(
                Contribution(units=unit_states(units, 1, cut), samples={i: tally.samples for i in range(1, cut + 1)})
            )
        tally.finish_s = env.now
        reports.append(_report(p, predicted.total, tally))

    for p in participants:
        env.process(device_process(p))
    env.run()

    trained_on_edge = {i: n for i, n in edge_samples.items() if n > 0}
    if trained_on_edge:
        contributions.append(
            Contribution(units=unit_states(edge_units, min(trained_on_edge), num_units), samples=trained_on_edge)
        )
    reports.sort(key=lambda r: r["device"])
    return contributions, reports


def _guarded_step(units, server_side, opt, edge_opt, train, indices, budget, predicted, tally):
    """One split step under the memory guard; updates ``tally``. Returns None on a simulated out-of-memory."""
    x, y = train.x[indices], train.y[indices]
    fixed = predicted.total - predicted.activations  # everything but the saved activations
    try:
        result = split_step(units, server_side, x, y, opt, edge_opt, saved_limit=max(budget - fixed, 0))
    except DeviceOutOfMemory:
        tally.oom_events += 1
        return None
    measured = (
        _static_bytes(units, opt)
        + x.numel() * x.element_size()
        + result.saved_bytes
        + predicted.cut_io
        + predicted.in_flight
        + predicted.workspace
    )
    tally.peak_measured = max(tally.peak_measured, measured)
    tally.steps += 1
    tally.samples += result.samples
    tally.losses.append(result.loss)
    return result


def _report(p: Participant, predicted: int, tally: _Tally) -> dict:
    return {
        "device": p.device.id,
        "class": p.device.device_class,
        "cut": p.cut,
        "budget_mb": round(p.budget / MB, 3),
        "peak_predicted_mb": round(predicted / MB, 3),
        "peak_measured_mb": round(tally.peak_measured / MB, 3),
        "oom_events": tally.oom_events,
        "steps": tally.steps,
        "samples": tally.samples,
        "loss": float(np.mean(tally.losses)) if tally.losses else None,
        "loss_rms": float(np.sqrt(np.mean(np.square(tally.losses)))) if tally.losses else None,
        "compute_s": tally.compute_s,
        "comm_s": tally.comm_s,
        "wait_s": tally.wait_s,
        "finish_s": tally.finish_s,
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
    }
