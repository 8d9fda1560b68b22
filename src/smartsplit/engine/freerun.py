"""A round at the devices' own pace: each device trains in its own thread as fast as it really goes, and its edge
serves steps in the order they arrive. Nothing is simulated: the times in the reports are measured by the wall
clock (in the fleet's seconds, wall seconds over ``time_scale``), so runs are not repeatable, unlike
``engine.round``'s lockstep, which they otherwise match phase for phase (the same ``DeviceSide`` calls, the same
``split_step``, the same reports)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

from smartsplit.engine.round import Participant, RoundParts, split_step
from smartsplit.errors import DeviceLost
from smartsplit.models.profile import ModelProfile
from smartsplit.messages import Activation, DeviceResult, Gradient, UnitHandoff
from smartsplit.roles.device import SimulatedTimes
from smartsplit.roles.edge import EdgeRole
from smartsplit.strategies.base import StepObserver


class EdgeTurn:
    """A device's way to its edge role: a step holds the edge from its first micro-batch to its last (the queue
    the device waits in is the lock's), and every other call takes the edge for itself."""

    def __init__(self, role: EdgeRole, lock: threading.Lock) -> None:
        self.role, self.lock = role, lock
        self.holding = False
        self.waited_s = 0.0

    def serve(self, activation: Activation) -> Gradient:
        if not self.holding:
            arrived = time.monotonic()
            self.lock.acquire()
            self.waited_s += time.monotonic() - arrived
            self.holding = True
        try:
            return self.role.serve(activation)
        finally:
            if activation.last:
                self._release()

    def abort(self, device_id: int) -> None:
        with self._held():
            self.role.abort(device_id)

    def receive(self, handoff: UnitHandoff) -> None:
        with self._held():
            self.role.receive(handoff)

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.lock.release()

    @contextlib.contextmanager
    def _held(self):
        """The edge for one call: mid-step (an abort) it is this device's already, and is let go after it."""
        if self.holding:
            try:
                yield
            finally:
                self._release()
        else:
            with self.lock:
                yield


class FreeDeviceRound:
    """One device's round at its own pace: download, then plan and step until its steps are done, the round's
    wall-clock deadline passes or it goes offline, then report. Budget traces and availability are read at the
    fleet's time of now (``start_s`` plus wall seconds over ``time_scale``)."""

    def __init__(self, participant: Participant, turn: EdgeTurn, profile: ModelProfile, start_s: float,
                 deadline_wall_s: float, time_scale: float, observer: StepObserver | None) -> None:
        self.device, self.instructions = participant.role, participant.instructions
        self.edge_index, self.turn = participant.edge, turn
        self.availability = participant.availability
        self.start_s, self.deadline_wall_s, self.scale, self.observer = start_s, deadline_wall_s, time_scale, observer
        self.profile, self.link_s = profile, participant.link_s
        self.times = SimulatedTimes()
        self.steps = 0
        self.began = time.monotonic()

    def elapsed_s(self) -> float:
        """Seconds of the fleet's time since the round began."""
        return (time.monotonic() - self.began) / self.scale

    def run(self, parts: RoundParts, parts_lock: threading.Lock) -> None:
        device = self.device
        with self.turn.lock:
            self.turn.role.open_session(device.id)
        dropped = False
        try:
            dropped = self._train()
        except DeviceLost:  # its process disconnected or stopped answering
            self.turn.abort(device.id)
            dropped = True
        if dropped:
            device.dropped_out()
        self._report(parts, parts_lock)

    def _train(self) -> bool:
        """The device's steps; True when it went offline (it drops out). Its clock starts once it answers: a
        device process still connecting or starting up is not yet training."""
        device = self.device
        device.budget_returns_at(self.start_s)  # changes nothing; answered once the device is ready
        self.began = time.monotonic()
        sizes = device.start_round(self.instructions, self.observer)
        self.times.bytes_down += self.profile.param_bytes(1, self.instructions.cut)
        while self.steps < len(sizes) and time.monotonic() - self.began < self.deadline_wall_s:
            now = self.start_s + self.elapsed_s()
            if self.availability is not None and not self.availability.online_at(now):
                return True
            plan, handoff = device.plan_step(now)
            if handoff is not None:
                self.turn.receive(handoff)
            if plan is None:
                resume = device.budget_returns_at(now)
                wait_wall = None if resume is None else (resume - now) * self.scale
                if wait_wall is None or time.monotonic() - self.began + wait_wall >= self.deadline_wall_s:
                    return False
                device.paused()
                self.times.paused_s += wait_wall / self.scale
                time.sleep(wait_wall)
                continue
            done = split_step(device, self.turn, self.steps)  # a device holding every unit never calls its edge
            if done is None:
                return False
            self.steps += 1
            self.times.bytes_up += done.cut_bytes
            self.times.bytes_down += done.cut_bytes
        return False

    def _report(self, parts: RoundParts, parts_lock: threading.Lock) -> None:
        device = self.device
        with self.turn.lock:
            handed_back, own_copy, seen_by_edge = self.turn.role.close_session(device.id)
        if handed_back is not None:
            device.take_back(handed_back)
        if self.steps:  # its update goes up
            self.times.bytes_up += self.profile.param_bytes(1, self.instructions.cut)
        self.times.wait_s = self.turn.waited_s / self.scale
        result = device.finish_round(self.times)
        # its update went up in finish_round: the round ends, and the link's time is known, only now
        finish = {"finish_s": self.elapsed_s()}
        if self.link_s is not None:
            finish["comm_s"] = self.link_s() / self.scale
        result = DeviceResult(result.update, dataclasses.replace(result.report, **finish), result.observations)
        with parts_lock:
            if result.update is not None:
                parts.device_updates[device.id] = (self.edge_index, [result.update, *([own_copy] if own_copy else [])])
                result = DeviceResult(result.update, result.report, result.observations + seen_by_edge)
            parts.results.append(result)


def run_free(participants: list[Participant], edge_roles: list[EdgeRole], profile: ModelProfile, start_s: float,
             deadline_wall_s: float, time_scale: float = 1.0, observer: StepObserver | None = None) -> RoundParts:
    """Every participant trains in its own thread at its own pace; each edge role must have started the round.
    The parts come back as ``engine.round.simulate``'s do (assemble them for aggregation)."""
    locks = [threading.Lock() for _ in edge_roles]
    parts, parts_lock = RoundParts({}, {}, []), threading.Lock()
    rounds = [FreeDeviceRound(p, EdgeTurn(edge_roles[p.edge], locks[p.edge]), profile, start_s, deadline_wall_s,
                              time_scale, observer) for p in participants]
    threads = [threading.Thread(target=r.run, args=(parts, parts_lock), name=f"device-{r.device.id}", daemon=True)
               for r in rounds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parts.shared.update((e, copy) for e, edge in enumerate(edge_roles) if (copy := edge.finish_round()) is not None)
    return parts
