"""One federated round: the round's devices train against one shared edge, interleaved in simulated time.

Each device is a SimPy process. A split step runs for real at the simulated moment the edge serves it, so
the shared edge copy sees the devices' steps in order of simulated arrival, never one device's whole round
after another's. Device-side weights are private, so running the device's forward and backward
at that moment too changes nothing but keeps the whole step in one place.

Before every step the device reads its memory budget and, if its strategy lets it, re-plans:
a cheaper plan at the same cut, else a shallower cut (its deeper units, with their optimizer state, are run
by the edge for the rest of the round), else a pause until the budget changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy
import torch
from torch import nn

from smartsplit.data import Dataset
from smartsplit.engine.aggregate import Contribution, unit_states
from smartsplit.engine.clock import EdgeSpec, model_transfer_s, step_times
from smartsplit.engine.step import make_optimizer, split_step
from smartsplit.fleet import AvailabilityTrace, BudgetTrace, Device
from smartsplit.managers.device import DevicePlan, OnDeviceManager
from smartsplit.managers.mec import StepSketches
from smartsplit.memory.measure import DeviceOutOfMemory
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
    batches: list[np.ndarray]  # sample indices of each local step
    trace: BudgetTrace  # memory budget over simulated time (absolute, across rounds)
    manager: OnDeviceManager
    replan: bool  # re-plans whenever its budget changes (else keeps its first plan, as the baselines do)
    move_cut: bool  # when no plan fits at its cut, hands units to the edge instead of pausing
    edge: int = 0  # index of the edge server the device is attached to
    availability: AvailabilityTrace | None = None  # when it is online (absolute time); None: always


@dataclass
class _Tally:
    steps: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    recompute_s: float = 0.0
    comm_s: float = 0.0
    wait_s: float = 0.0
    paused_s: float = 0.0
    finish_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    peak_predicted: int = 0
    peak_measured: int | None = None  # by the meter; None when no meter measured
    min_budget: int | None = None
    oom_events: int = 0
    replans: int = 0
    cut_moves: int = 0
    pauses: int = 0
    dropped_out: bool = False
    micro_batches: set[int] = field(default_factory=set)


@dataclass
class EdgeServer:
    """An edge server: its throughput, its queue, and the server-side copy its devices train."""

    spec: EdgeSpec
    queue: simpy.Resource
    units: nn.Sequential | None  # the shared copy; None when every device gets its own
    opt: torch.optim.Optimizer | None
    samples: dict[int, int]  # samples that trained each unit of the shared copy


def run_round(
    global_units: nn.Sequential,
    participants: list[Participant],
    train: Dataset,
    profile: ModelProfile,
    edges: list[EdgeSpec],
    optimizer: OptimizerSpec,
    start_s: float = 0.0,
    deadline_s: float | None = None,
    edge_copies: str = "shared",
    edge_order: str = "interleaved",
    sketcher=None,
    measure: Callable[[DevicePlan], int] | None = None,
) -> tuple[list[list[Contribution]], list[dict], dict[int, dict[int, StepSketches]]]:
    """Train every participant from ``global_units``.

    Returns the trained copies grouped by edge server (for hierarchical aggregation), one report per device,
    and, with a ``sketcher``, each device's per-step gradient sketches of every unit it trained through
    (``StepSketches``, for the MEC manager), each taken right after the step, while the device holds the edge.
    ``start_s`` is the round's start on the experiment's clock (budget traces are read at ``start_s + now``);
    a device still paused at ``deadline_s`` into the round stops there, its finished steps counted.
    ``edge_copies``: "shared" (one server-side copy per edge, fed by all its devices) or "per-device".
    ``edge_order``: "interleaved" (steps in simulated arrival order) or "sequential" (one device's whole
    round after another's, as SplitFed-v2 does).
    ``measure(plan)`` gives the memory meter's peak of one device step under ``plan``; a step whose measured peak
    is above the device's budget at that moment is an out-of-memory event. Without it, only the guard counts.
    A device whose availability trace takes it offline mid-round drops out at that moment: a step that would not
    end before it runs neither on the device nor on the edge, the edge queue is let go, its finished steps count
    (its update as of its last finished step is aggregated; the upload's time is not charged), and the round
    goes on without it.
    """
    num_units = len(global_units)
    env = simpy.Environment()
    servers = []
    for spec in edges:
        shared = copy.deepcopy(global_units) if edge_copies == "shared" else None
        opt = make_optimizer(list(shared.parameters()), optimizer.name, optimizer.lr, optimizer.momentum) if shared else None
        servers.append(EdgeServer(spec, simpy.Resource(env, capacity=1), shared, opt, {i: 0 for i in range(1, num_units + 1)}))
    contributions: list[list[Contribution]] = [[] for _ in servers]
    reports: list[dict] = []
    updates: dict[int, dict[int, StepSketches]] = {}

    def take_sketch(sketch: dict[int, StepSketches], device_side: nn.Sequential, edge_side: nn.Sequential) -> None:
        """This step's gradient sketch of every unit, device and edge side, for the MEC manager."""
        if sketcher is None:
            return
        for index, unit in enumerate([*device_side, *edge_side], start=1):
            sketch.setdefault(index, StepSketches(np.zeros(0))).add(sketcher.grad_sketch(index, unit))

    def device_process(p: Participant, after: simpy.Process | None):
        if after is not None:
            yield after  # sequential order: wait for the previous device's whole round
        server = servers[p.edge]
        edge = server.spec
        dev, tally = p.device, _Tally()
        units = copy.deepcopy(global_units[: p.cut])  # the device's private copy, trained on its data only
        opt = make_optimizer(list(units.parameters()), optimizer.name, optimizer.lr, optimizer.momentum)
        if server.units is not None:
            server_units, server_opt, server_samples = server.units, server.opt, server.samples
        else:  # this device's own server-side copy
            server_units = copy.deepcopy(global_units)
            server_opt = make_optimizer(list(server_units[p.cut :].parameters()), optimizer.name, optimizer.lr, optimizer.momentum)
            server_samples = {i: 0 for i in range(1, num_units + 1)}
        sketch: dict[int, StepSketches] = {}
        cut = p.cut
        offline = p.availability.offline_from(start_s) if p.availability is not None else None
        offline_at = None if offline is None else offline - start_s  # seconds into the round

        def stays_online(seconds: float) -> bool:
            return offline_at is None or env.now + seconds <= offline_at

        down_s, up_s = model_transfer_s(profile, p.cut, dev, edge)
        if not stays_online(down_s):
            tally.dropped_out = True
        else:
            yield env.timeout(down_s)
            tally.comm_s += down_s
            tally.bytes_down += profile.param_bytes(1, p.cut)

        plan: DevicePlan | None = None
        planned_for = -1
        i = 0
        while i < len(p.batches) and not tally.dropped_out:
            indices = p.batches[i]
            budget = p.trace.at(start_s + env.now)
            tally.min_budget = budget if tally.min_budget is None else min(tally.min_budget, budget)
            if plan is None or (p.replan and budget != planned_for):
                new = p.manager.deepest_fitting_cut(cut, budget) if p.move_cut else p.manager.plan(cut, budget)
                if new is None and not p.replan:
                    new = p.manager.plan(cut, 2**62)  # a baseline runs its plain plan whatever the budget says
                if new is None:  # nothing fits, not even cut 1: wait for memory to come back
                    resume = p.trace.next_change(start_s + env.now)
                    if resume is None or (deadline_s is not None and resume - start_s >= deadline_s):
                        break
                    if not stays_online(resume - start_s - env.now):
                        tally.dropped_out = True
                        break
                    tally.pauses += 1
                    tally.paused_s += resume - start_s - env.now
                    yield env.timeout(resume - start_s - env.now)
                    continue
                if plan is not None and new != plan:
                    tally.replans += 1
                if new.cut < cut:
                    tally.cut_moves += 1
                plan, planned_for, cut = new, budget, new.cut
            tally.micro_batches.add(plan.micro_batch)
            tally.peak_predicted = max(tally.peak_predicted, plan.peak_bytes)

            scale = len(indices) / profile.batch
            t = step_times(profile, cut, dev, edge, scale, plan.recompute_flops, -(-len(indices) // plan.micro_batch))
            # units the device gave up mid-round run on the edge, still as this device's copy
            device_side, edge_side = units[:cut], nn.Sequential(*units[cut:], *server_units[p.cut :])
            if not stays_online(t.forward_s + (t.uplink_s if edge_side else t.backward_s)):
                tally.dropped_out = True
                break
            yield env.timeout(t.forward_s)
            if edge_side:
                yield env.timeout(t.uplink_s)
                arrived = env.now
                with server.queue.request() as turn:
                    if offline_at is None:
                        yield turn
                    elif turn not in (yield turn | env.timeout(max(offline_at - env.now, 0.0))):
                        tally.dropped_out = True  # went offline in the queue: the request is let go
                        break
                    tally.wait_s += env.now - arrived
                    if not stays_online(t.edge_s + t.downlink_s + t.backward_s):
                        tally.dropped_out = True  # would leave before the step ends: it is not run at all
                        break
                    result = _guarded_step(device_side, edge_side, opt, server_opt, train, indices, plan, budget, tally, measure)
                    if result is not None:  # a step that ran out of memory on the device never reached the edge
                        take_sketch(sketch, device_side, edge_side)  # now, before another device's step reuses the edge
                        yield env.timeout(t.edge_s)
                if result is not None:
                    yield env.timeout(t.downlink_s)
            else:
                result = _guarded_step(device_side, edge_side, opt, None, train, indices, plan, budget, tally, measure)
                if result is not None:
                    take_sketch(sketch, device_side, edge_side)
            if result is None:  # simulated out-of-memory: the step is lost and the device drops out of the round
                break
            i += 1
            yield env.timeout(t.backward_s)
            tally.compute_s += t.forward_s + t.backward_s
            tally.recompute_s += plan.recompute_flops * scale / dev.flops_per_s
            tally.comm_s += t.uplink_s + t.downlink_s
            tally.bytes_up += result.cut_bytes
            tally.bytes_down += result.cut_bytes
            for unit in range(p.cut + 1, num_units + 1):
                server_samples[unit] += result.samples

        if tally.dropped_out:
            yield env.timeout(max(offline_at - env.now, 0.0))  # it leaves at that moment
        if tally.steps:
            if not tally.dropped_out:
                yield env.timeout(up_s)
                tally.comm_s += up_s
                tally.bytes_up += profile.param_bytes(1, p.cut)
            contributions[p.edge].append(
                Contribution(units=unit_states(units, 1, p.cut), samples={i: tally.samples for i in range(1, p.cut + 1)})
            )
            if server.units is None and p.cut < num_units:
                contributions[p.edge].append(_edge_contribution(server_units, server_samples))
            if sketch:
                updates[p.device.id] = sketch
        tally.finish_s = env.now
        reports.append(_report(p, cut, tally))

    previous = None
    for p in participants:
        process = env.process(device_process(p, previous if edge_order == "sequential" else None))
        previous = process
    env.run()

    for server, group in zip(servers, contributions):
        if server.units is not None:
            contribution = _edge_contribution(server.units, server.samples)
            if contribution is not None:
                group.append(contribution)
    reports.sort(key=lambda r: r["device"])
    return contributions, reports, updates


def _edge_contribution(units: nn.Sequential, samples: dict[int, int]) -> Contribution | None:
    trained = {i: n for i, n in samples.items() if n > 0}
    if not trained:
        return None
    return Contribution(units=unit_states(units, min(trained), len(units)), samples=trained)


def _guarded_step(device_side, edge_side, opt, edge_opt, train, indices, plan: DevicePlan, budget, tally, measure):
    """One split step under the memory guard; updates ``tally``. Returns None on a simulated out-of-memory.

    The guard lets the forward save what the plan predicts it holds plus whatever room the budget leaves above
    the plan's predicted peak, and the cut activation (which the last unit may save; it is counted apart); a
    forward that saves more stops before the edge or any weight is touched.
    """
    x, y = train.x[indices], train.y[indices]
    mem = plan.memory
    if mem.total - mem.activations > budget:  # even with nothing saved the step does not fit: it cannot start
        tally.oom_events += 1
        return None
    try:
        result = split_step(
            device_side, edge_side, x, y, opt, edge_opt,
            micro_batch=plan.micro_batch, segments=plan.segments,
            saved_limit=max(plan.held_bytes + budget - plan.peak_bytes, 0) + mem.cut_io // 2,
        )
    except DeviceOutOfMemory:
        tally.oom_events += 1
        return None
    if measure is not None:
        measured = measure(plan)
        tally.peak_measured = max(tally.peak_measured or 0, measured)
        if measured > budget:
            tally.oom_events += 1
    tally.steps += 1
    tally.samples += result.samples
    tally.losses.append(result.loss)
    return result


def _report(p: Participant, final_cut: int, tally: _Tally) -> dict:
    return {
        "device": p.device.id,
        "class": p.device.device_class,
        "cut": p.cut,
        "final_cut": final_cut,
        "budget_mb": round(p.trace.at(0.0) / MB, 3) if tally.min_budget is None else round(tally.min_budget / MB, 3),
        "peak_predicted_mb": round(tally.peak_predicted / MB, 3),
        "peak_measured_mb": round(tally.peak_measured / MB, 3) if tally.peak_measured is not None else None,
        "micro_batches": sorted(tally.micro_batches),
        "oom_events": tally.oom_events,
        "replans": tally.replans,
        "cut_moves": tally.cut_moves,
        "pauses": tally.pauses,
        "dropped_out": tally.dropped_out,
        "steps": tally.steps,
        "samples": tally.samples,
        "loss": float(np.mean(tally.losses)) if tally.losses else None,
        "loss_rms": float(np.sqrt(np.mean(np.square(tally.losses)))) if tally.losses else None,
        "compute_s": tally.compute_s,
        "recompute_s": tally.recompute_s,
        "comm_s": tally.comm_s,
        "wait_s": tally.wait_s,
        "paused_s": tally.paused_s,
        "finish_s": tally.finish_s,
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
    }
