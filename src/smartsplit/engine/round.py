"""One federated round: the round's devices train against their edge servers, interleaved in simulated time.

The engine wires the roles (``smartsplit.roles``) with SimPy in one process: each device is a SimPy process
that passes messages between its device role and its edge role at the simulated moments they would travel.
A split step runs for real at the simulated moment the edge serves it, so a shared edge copy sees the devices'
steps in order of simulated arrival, never one device's whole round after another's. Device-side weights are
private, so running the device's forward and backward at that moment too changes nothing.

Before every step the device reads its memory budget and, if its rules let it, re-plans: a cheaper plan at
the same cut, else a shallower cut (its deeper units, with their optimizer state, go to the edge, which
trains them as the device's for the rest of the round), else a pause until the budget changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from smartsplit.strategies.options import EngineOptions
from smartsplit.errors import DeviceLost
from smartsplit.fleet import AvailabilityTrace
from smartsplit.fleet.clock import EdgeSpec, model_transfer_s, recompute_s, step_times
from smartsplit.kernels.saved import DeviceOutOfMemory
from smartsplit.models.profile import ModelProfile
from smartsplit.roles.device import DeviceRole, SimulatedTimes, StepDone
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import DeviceResult, Observation, RoundInstructions, Update
from smartsplit.strategies.base import StepObserver


@dataclass
class Participant:
    role: DeviceRole
    instructions: RoundInstructions
    edge: int = 0  # index of the edge server the device is attached to
    availability: AvailabilityTrace | None = None  # when it is online (absolute time); None: always


@dataclass
class RoundOutcome:
    updates: list[list[Update]]  # per edge server: its devices' updates and its own copies', for aggregation
    results: list[DeviceResult]  # per device, by device id
    faults: dict[str, int] = field(default_factory=dict)  # deployed runs: device disconnects, timeouts, edge rejoins
    wire: dict[str, int] = field(default_factory=dict)  # deployed runs: bytes that crossed the links, by kind

    @property
    def reports(self):
        return [r.report for r in self.results]

    @property
    def observations(self) -> dict[int, list[Observation]]:
        return {r.report.device: r.observations for r in self.results if r.observations}


def run_round(
    participants: list[Participant],
    edges: list[EdgeRole],
    edge_specs: list[EdgeSpec],
    profile: ModelProfile,
    start_s: float = 0.0,
    deadline_s: float | None = None,
    options: EngineOptions = EngineOptions(),
    observer: StepObserver | None = None,
) -> RoundOutcome:
    """Train every participant; each edge role must have started the round (``EdgeRole.start_round``).

    ``start_s`` is the round's start on the experiment's clock (budget traces are read at ``start_s + now``);
    a device still paused at ``deadline_s`` into the round stops there, its finished steps counted.
    ``options.edge_order``: "interleaved" (steps in simulated arrival order) or "sequential" (one device's
    whole round after another's, as SplitFed-v2 does). ``observer`` is the strategy's step observer, run by
    the role holding each unit right after every step.
    A device whose availability trace takes it offline mid-round drops out at that moment: a step that would not
    end before it runs neither on the device nor on the edge, the edge queue is let go, its finished steps count
    (its update as of its last finished step is aggregated; the upload's time is not charged), and the round
    goes on without it.
    Each edge's updates come in device-id order (a device's update, then the edge's copy of its units), the
    shared copy last: aggregation does not depend on which device finished first, so devices that share
    nothing can train apart (``runtime.workers``) and give the same global model.
    """
    return assemble(simulate(participants, edges, edge_specs, profile, start_s, deadline_s, options, observer),
                    len(edges))


@dataclass
class RoundParts:
    """What a simulated round produced, before it is put in aggregation order: several parts (devices that
    trained apart) assemble into the outcome one simulation of them all would have given."""

    device_updates: dict[int, tuple[int, list[Update]]]  # device id -> (edge, its update and the edge's copy)
    shared: dict[int, Update]  # edge -> its shared copy (edges that keep one)
    results: list[DeviceResult]


def assemble(parts: list[RoundParts] | RoundParts, num_edges: int) -> RoundOutcome:
    """The round's outcome from its parts: per edge, its devices' updates in device-id order, then its shared
    copy (an edge's shared copy must come from one part only)."""
    parts = [parts] if isinstance(parts, RoundParts) else parts
    updates: list[list[Update]] = [[] for _ in range(num_edges)]
    device_updates = {d: u for part in parts for d, u in part.device_updates.items()}
    for device in sorted(device_updates):
        edge, group = device_updates[device]
        updates[edge].extend(group)
    for part in parts:
        for edge, shared in part.shared.items():
            updates[edge].append(shared)
    results = sorted((r for part in parts for r in part.results), key=lambda r: r.report.device)
    return RoundOutcome(updates, results)


def simulate(
    participants: list[Participant],
    edges: list[EdgeRole],
    edge_specs: list[EdgeSpec],
    profile: ModelProfile,
    start_s: float = 0.0,
    deadline_s: float | None = None,
    options: EngineOptions = EngineOptions(),
    observer: StepObserver | None = None,
) -> RoundParts:
    """``run_round``'s simulation, its results not yet in aggregation order."""
    num_units = profile.num_units
    env = simpy.Environment()
    queues = [simpy.Resource(env, capacity=1) for _ in edges]
    device_updates: dict[int, tuple[int, list[Update]]] = {}
    results: list[DeviceResult] = []

    def device_process(p: Participant, after: simpy.Process | None):
        if after is not None:
            yield after  # sequential order: wait for the previous device's whole round
        device, edge, spec, queue = p.role, edges[p.edge], edge_specs[p.edge], queues[p.edge]
        assigned = p.instructions.cut
        edge.open(device.id)
        times, dropped = SimulatedTimes(), False
        offline = p.availability.offline_from(start_s) if p.availability is not None else None
        offline_at = None if offline is None else offline - start_s  # seconds into the round

        def stays_online(seconds: float) -> bool:
            return offline_at is None or env.now + seconds <= offline_at

        i, steps, resumed_at = 0, 0, 0.0
        try:
            device.start_round(p.instructions, observer)
            down_s, up_s = model_transfer_s(profile, assigned, device.device, spec)
            if not stays_online(down_s):
                dropped = True
            else:
                yield env.timeout(down_s)
                times.comm_s += down_s
                times.bytes_down += profile.param_bytes(1, assigned)

            while i < device.batches and not dropped:
                # after a pause, the budget is read at the very moment it changed: start_s + now may fall an ulp short
                clock = max(start_s + env.now, resumed_at)
                plan, handoff = device.plan_step(clock)
                if handoff is not None:
                    edge.receive(handoff)
                if plan is None:  # nothing fits, not even cut 1: wait for memory to come back
                    resume = device.budget_returns_at(clock)
                    if resume is None or (deadline_s is not None and resume - start_s >= deadline_s):
                        break
                    wait = max(resume - start_s - env.now, 0.0)
                    if not stays_online(wait):
                        dropped = True
                        break
                    device.paused()
                    times.paused_s += wait
                    yield env.timeout(wait)
                    resumed_at = resume
                    continue

                size = device.batch_len(i)
                scale = size / profile.batch
                t = step_times(profile, device.cut, device.device, spec, scale, plan.recompute_flops, -(-size // plan.micro_batch))
                to_edge = device.cut < num_units  # units past the device's cut (its own handed-over ones too) run on the edge
                if not stays_online(t.forward_s + (t.uplink_s if to_edge else t.backward_s)):
                    dropped = True
                    break
                yield env.timeout(t.forward_s)
                if to_edge:
                    yield env.timeout(t.uplink_s)
                    arrived = env.now
                    with queue.request() as turn:
                        if offline_at is None:
                            yield turn
                        elif turn not in (yield turn | env.timeout(max(offline_at - env.now, 0.0))):
                            dropped = True  # went offline in the queue: the request is let go
                            break
                        times.wait_s += env.now - arrived
                        if not stays_online(t.edge_s + t.downlink_s + t.backward_s):
                            dropped = True  # would leave before the step ends: it is not run at all
                            break
                        done = split_step(device, edge, i)
                        if done is not None:
                            yield env.timeout(t.edge_s)
                    if done is not None:
                        yield env.timeout(t.downlink_s)
                else:
                    done = split_step(device, None, i)
                if done is None:  # simulated out-of-memory: the step is lost and the device drops out of the round
                    break
                i, steps = i + 1, steps + 1
                yield env.timeout(t.backward_s)
                times.compute_s += t.forward_s + t.backward_s
                times.recompute_s += recompute_s(plan.recompute_flops, device.device.flops_per_s, scale)
                times.comm_s += t.uplink_s + t.downlink_s
                times.bytes_up += done.cut_bytes
                times.bytes_down += done.cut_bytes
        except DeviceLost:  # a device in another process disconnected or stopped answering: it drops out now
            edge.abort(device.id)
            dropped = True

        if dropped:
            device.dropped_out()
            if offline_at is not None:
                yield env.timeout(max(offline_at - env.now, 0.0))  # it leaves at that moment
        if steps and not dropped:
            yield env.timeout(up_s)
            times.comm_s += up_s
            times.bytes_up += profile.param_bytes(1, assigned)
        handed_back, own_copy, seen_by_edge = edge.close(device.id)
        if handed_back is not None:
            device.take_back(handed_back)
        times.finish_s = env.now
        result = device.finish_round(times)
        if result.update is not None:
            device_updates[device.id] = (p.edge, [result.update] + ([own_copy] if own_copy is not None else []))
            result = DeviceResult(result.update, result.report, result.observations + seen_by_edge)
        results.append(result)

    previous = None
    for p in participants:
        process = env.process(device_process(p, previous if options.edge_order == "sequential" else None))
        previous = process
    env.run()

    shared = {e: copy for e, edge in enumerate(edges) if (copy := edge.finish_round()) is not None}
    return RoundParts(device_updates, shared, results)


def split_step(device: DeviceRole, edge: EdgeRole | None, step: int) -> StepDone | None:
    """One local step, micro-batch by micro-batch: the device's activation up, the edge's gradient down.
    None when the step ran out of memory on the device (it cannot start, or the memory guard stopped a
    forward), in which case the edge drops what it accumulated."""
    if not device.begin_step(step):
        return None
    try:
        for micro_batch in range(device.micro_batches()):
            activation = device.forward(micro_batch)
            if activation is not None:
                device.backward(edge.serve(activation))
    except DeviceOutOfMemory:
        if edge is not None:
            edge.abort(device.id)
        return None
    return device.end_step()
