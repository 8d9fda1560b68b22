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
from typing import TYPE_CHECKING, Callable

import simpy

from smartsplit.strategies.options import EngineOptions
from smartsplit.errors import DeviceLost
from smartsplit.fleet import AvailabilityTrace
from smartsplit.fleet.clock import EdgeSpec, model_transfer_s, recompute_s, step_times
from smartsplit.kernels.saved import DeviceOutOfMemory
from smartsplit.models.profile import ModelProfile
from smartsplit.memory.ondevice import DevicePlan
from smartsplit.roles.device import DeviceSide, SimulatedTimes, StepDone
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import DeviceResult, Observation, RoundInstructions, Update
from smartsplit.strategies.base import StepObserver

if TYPE_CHECKING:
    from smartsplit.engine.grouping import Grouping


@dataclass
class Participant:
    role: DeviceSide
    instructions: RoundInstructions
    edge: int = 0  # index of the edge server the device is attached to
    availability: AvailabilityTrace | None = None  # when it is online (absolute time); None: always
    link_s: Callable[[], float] | None = None  # free-running rounds: wall seconds its emulated link has taken


@dataclass
class RoundOutcome:
    updates: list[list[Update]]  # per edge server: its devices' updates and its own copies', for aggregation
    results: list[DeviceResult]  # per device, by device id
    faults: dict[str, int] = field(default_factory=dict)  # deployed runs: device disconnects, timeouts, edge rejoins
    wire: dict[str, int] = field(default_factory=dict)  # deployed runs: bytes that crossed the links, by kind
    measured: bool = False  # the reports' times were measured by the wall clock (free-running), not simulated

    @property
    def reports(self):
        return [r.report for r in self.results]

    @property
    def observations(self) -> dict[int, list[Observation]]:
        return {r.report.device: r.observations for r in self.results if r.observations}


def train_round(
    participants: list[Participant],
    edge_roles: list[EdgeRole],
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
    return assemble(simulate(participants, edge_roles, edge_specs, profile, start_s, deadline_s, options,
                             observer), len(edge_roles))


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
    edge_roles: list[EdgeRole],
    edge_specs: list[EdgeSpec],
    profile: ModelProfile,
    start_s: float = 0.0,
    deadline_s: float | None = None,
    options: EngineOptions = EngineOptions(),
    observer: StepObserver | None = None,
    grouping: Grouping | None = None,
) -> RoundParts:
    """``train_round``'s simulation, its results not yet in aggregation order. With ``grouping``, devices that
    may step together defer their steps' arithmetic (``engine.grouping``): it runs, grouped, once the simulated
    round has ended, and then they report."""
    env = simpy.Environment()
    queues = [simpy.Resource(env, capacity=1) for _ in edge_roles]
    parts = RoundParts({}, {}, [])
    if grouping is not None and observer is None:
        grouping.defer(participants, edge_roles, profile, options.edge_copies)
    previous, waiting = None, []
    for p in participants:
        device_round = DeviceRound(env, p, edge_roles[p.edge], edge_specs[p.edge], queues[p.edge], profile, start_s,
                                   deadline_s, observer, waiting)
        after = previous if options.edge_order == "sequential" else None
        previous = env.process(device_round.run(after, parts))
    env.run()
    if waiting:
        grouping.run([w.device for w in waiting])
        for w in waiting:
            w.report(parts)
    parts.shared.update((e, copy) for e, edge in enumerate(edge_roles) if (copy := edge.finish_round()) is not None)
    return parts


class _DropsOut(Exception):
    """The device leaves the round now: it goes offline, or (deployed) its process is lost."""


class DeviceRound:
    """One device's part of a round, phase by phase, on the round's simulated clock: ``download`` its units,
    then ``plan`` (waiting while nothing fits) and ``step`` until its local steps are done, and ``report``.
    Every way out early (offline before a transfer or a step ends, offline while queued at the edge, the device
    process lost) raises ``_DropsOut``, and ``drop_out`` handles them all alike. ``device`` is any
    ``DeviceSide``: the simulator's role, or a device in another process."""

    def __init__(self, env: simpy.Environment, participant: Participant, edge: EdgeRole, spec: EdgeSpec,
                 queue: simpy.Resource, profile: ModelProfile, start_s: float, deadline_s: float | None,
                 observer: StepObserver | None, waiting: list | None = None) -> None:
        self.env, self.edge, self.spec, self.queue, self.profile = env, edge, spec, queue, profile
        self.device: DeviceSide = participant.role
        self.instructions, self.edge_index = participant.instructions, participant.edge
        self.start_s, self.deadline_s, self.observer = start_s, deadline_s, observer
        self.times = SimulatedTimes()
        offline = participant.availability.offline_from(start_s) if participant.availability is not None else None
        self.offline_at = None if offline is None else offline - start_s  # seconds into the round
        self.step_sizes: list[int] = []
        self.steps = 0
        self.resumed_at = 0.0
        self.waiting = waiting  # where a device whose steps' arithmetic waits (engine.grouping) reports from

    def run(self, after: simpy.Process | None, parts: RoundParts):
        """The SimPy process: the phases in order; the device's result goes into ``parts``."""
        if after is not None:
            yield after  # sequential order: wait for the previous device's whole round
        self.edge.open_session(self.device.id)
        dropped = False
        try:
            yield from self.download()
            while self.steps < len(self.step_sizes):
                plan = yield from self.plan()
                if plan is None or not (yield from self.step(plan)):
                    break  # past the deadline with nothing fitting, or out of memory: the round ends here for it
        except DeviceLost:  # a device in another process disconnected or stopped answering
            self.edge.abort(self.device.id)
            dropped = True
        except _DropsOut:
            dropped = True
        if dropped:
            yield from self.drop_out()
        elif self.steps:
            yield from self.upload()
        self.times.finish_s = self.env.now
        if self.waiting is not None and getattr(self.device, "waiting", False):
            self.waiting.append(self)  # it reports once its steps have run, after the simulated round
        else:
            self.report(parts)

    def must_stay_online(self, seconds: float) -> None:
        if self.offline_at is not None and self.env.now + seconds > self.offline_at:
            raise _DropsOut

    def download(self):
        """The device loads its units; the model's weights cross the downlink."""
        self.step_sizes = self.device.start_round(self.instructions, self.observer)
        cut = self.instructions.cut
        down_s, self.upload_s = model_transfer_s(self.profile, cut, self.device.device, self.spec)
        self.must_stay_online(down_s)
        yield self.env.timeout(down_s)
        self.times.comm_s += down_s
        self.times.bytes_down += self.profile.param_bytes(1, cut)

    def plan(self):
        """The plan of the next step at the budget of now: units the device gives up go to the edge (the
        hand-off); while nothing fits, not even cut 1, it waits for memory to come back. None: it would not
        come back before the deadline (or ever)."""
        while True:
            # after a pause, the budget is read at the very moment it changed: start_s + now may fall an ulp short
            clock = max(self.start_s + self.env.now, self.resumed_at)
            plan, handoff = self.device.plan_step(clock)
            if handoff is not None:
                self.edge.receive(handoff)
            if plan is not None:
                return plan
            resume = self.device.budget_returns_at(clock)
            if resume is None or (self.deadline_s is not None and resume - self.start_s >= self.deadline_s):
                return None
            wait = max(resume - self.start_s - self.env.now, 0.0)
            self.must_stay_online(wait)
            self.device.paused()
            self.times.paused_s += wait
            yield self.env.timeout(wait)
            self.resumed_at = resume

    def step(self, plan: DevicePlan):
        """One local step under ``plan``, timed by the clock model: forward, the activation up, the edge's turn
        (its queue), the gradient down, backward. False when the step ran out of memory."""
        env, profile, times = self.env, self.profile, self.times
        size = self.step_sizes[self.steps]
        scale = size / profile.batch
        t = step_times(profile, plan.cut, self.device.device, self.spec, scale, plan.recompute_flops,
                       -(-size // plan.micro_batch))
        to_edge = plan.cut < profile.num_units  # units past the device's cut (its own handed-over ones too) run on the edge
        self.must_stay_online(t.forward_s + (t.uplink_s if to_edge else t.backward_s))
        yield env.timeout(t.forward_s)
        if to_edge:
            yield env.timeout(t.uplink_s)
            done = yield from self.edge_turn(t)
            if done is not None:
                yield env.timeout(t.downlink_s)
        else:
            done = split_step(self.device, None, self.steps)
        if done is None:  # simulated out-of-memory: the step is lost and the device drops out of the round
            return False
        self.steps += 1
        yield env.timeout(t.backward_s)
        times.compute_s += t.forward_s + t.backward_s
        times.recompute_s += recompute_s(plan.recompute_flops, self.device.device.flops_per_s, scale)
        times.comm_s += t.uplink_s + t.downlink_s
        times.bytes_up += done.cut_bytes
        times.bytes_down += done.cut_bytes
        return True

    def edge_turn(self, t):
        """Queue at the edge, then run the split step while the edge serves this device alone."""
        arrived = self.env.now
        with self.queue.request() as turn:
            if self.offline_at is None:
                yield turn
            elif turn not in (yield turn | self.env.timeout(max(self.offline_at - self.env.now, 0.0))):
                raise _DropsOut  # went offline in the queue: the request is let go
            self.times.wait_s += self.env.now - arrived
            self.must_stay_online(t.edge_s + t.downlink_s + t.backward_s)  # else the step is not run at all
            done = split_step(self.device, self.edge, self.steps)
            if done is not None:
                yield self.env.timeout(t.edge_s)
        return done

    def drop_out(self):
        """Its finished steps count (its update as of the last one is aggregated; no upload is charged); it
        leaves at the moment it goes offline."""
        self.device.dropped_out()
        if self.offline_at is not None:
            yield self.env.timeout(max(self.offline_at - self.env.now, 0.0))

    def upload(self):
        yield self.env.timeout(self.upload_s)
        self.times.comm_s += self.upload_s
        self.times.bytes_up += self.profile.param_bytes(1, self.instructions.cut)

    def report(self, parts: RoundParts) -> None:
        """The edge returns the units the device handed it; the device reports; its update, and the edge's copy
        of its units, join the round's parts."""
        device = self.device
        handed_back, own_copy, seen_by_edge = self.edge.close_session(device.id)
        if handed_back is not None:
            device.take_back(handed_back)
        result = device.finish_round(self.times)
        if result.update is not None:
            parts.device_updates[device.id] = (self.edge_index, [result.update, *([own_copy] if own_copy else [])])
            result = DeviceResult(result.update, result.report, result.observations + seen_by_edge)
        parts.results.append(result)


def split_step(device: DeviceSide, edge: EdgeRole | None, step: int) -> StepDone | None:
    """One local step, micro-batch by micro-batch: the device's forward to its cut, the activation up, the edge's
    forward, loss and backward, the gradient down, the device's backward; then both optimizers step. With no
    edge the device holds every unit and computes the loss itself. None when the step ran out of memory on
    the device (it cannot start, or the memory guard stopped a forward); the edge then drops what it
    accumulated. (``kernels.step.reference_step`` is the same maths in one call, both halves in this process.)"""
    micro_batches = device.begin_step(step)
    if not micro_batches:
        return None
    try:
        for micro_batch in range(micro_batches):
            activation = device.forward(micro_batch)
            if activation is not None:
                device.backward(edge.serve(activation))
    except DeviceOutOfMemory:
        if edge is not None:
            edge.abort(device.id)
        return None
    return device.end_step()
