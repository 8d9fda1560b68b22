"""The edge server process: the server-side copies of its devices' units, and the pace of their rounds.

It registers with the central server (which tells it the run's config and which devices are its), listens for
its devices' streams, and each round runs the round engine over them (``engine.round.train_round``) with the
devices in their own processes: every call the engine makes on a device role crosses the stream, in the order
of the simulated clock (lockstep), so a deployed run trains exactly what the embedded engine trains. A device
that disconnects or does not answer within the timeout drops out of the round (``DeviceLost``).

An edge accepts a device only if the device's certificate names it (``device-<id>``) and the central server
assigned that device to this edge; every refusal is logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import yaml

from smartsplit.config import build_config
from smartsplit.deploy import smartsplit_pb2_grpc as rpc
from smartsplit.deploy.link import claimed, open_channel, peer_identity, start_server
from smartsplit.deploy.wire import Reassembly, decode, encode, frames, plain, typed
from smartsplit.engine.round import Participant, train_round
from smartsplit.errors import DeviceLost, SmartSplitError
from smartsplit.fleet import AvailabilityTrace, Device
from smartsplit.fleet.clock import EdgeSpec
from smartsplit.memory.ondevice import DevicePlan
from smartsplit.models.profile import ModelProfile
from smartsplit.kernels.saved import DeviceOutOfMemory
from smartsplit.models.zoo import build_model
from smartsplit.roles.device import OptimizerSpec, RoundTally, SimulatedTimes, StepDone
from smartsplit.strategies.options import EngineOptions
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import DeviceResult
from smartsplit.strategies import make_strategy

log = logging.getLogger(__name__)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Link:
    """One device's stream, seen from the edge: calls go out, replies come in; the bytes that crossed."""

    def __init__(self, device_id: int) -> None:
        self.device_id = device_id
        self.outgoing: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.closed = False  # the stream ended, or the edge gave up on it: the device must connect again
        self.frame_bytes = {"up": 0, "down": 0}

    def call(self, payload, timeout_s: float):
        self.frame_bytes["down"] += payload.ByteSize()
        self.outgoing.put(payload)
        try:
            reply = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            raise DeviceLost(f"device {self.device_id} did not answer within {timeout_s:.0f} s") from None
        if reply is None:
            raise DeviceLost(f"device {self.device_id} disconnected")
        self.frame_bytes["up"] += reply.ByteSize()
        return reply

    def close(self, farewell=None) -> None:
        self.closed = True
        if farewell is not None:
            self.outgoing.put(farewell)
        self.outgoing.put(None)
        self.replies.put(None)


class EdgeService(rpc.EdgeServicer):
    """The devices' side of the edge: authenticates each stream and keeps the latest link per device."""

    def __init__(self, assigned: dict[int, dict], config_text: str, optimizer) -> None:
        self.assigned = assigned  # device id -> what the device needs to know (Device, shard, trace)
        self.config_text, self.optimizer = config_text, optimizer
        self._links: dict[int, _Link] = {}
        self._changed = threading.Condition()
        self.refusals = 0

    def link(self, device_id: int, wait_s: float) -> _Link | None:
        """The device's link once it is connected and ready, waiting up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while True:
                link = self._links.get(device_id)
                if link is not None and link.ready.is_set() and not link.closed:
                    return link
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.5))

    def close_all(self) -> None:
        with self._changed:
            for link in self._links.values():
                link.close(encode("bye"))
            self._links.clear()

    def _refuse(self, context, identity, why: str) -> None:
        self.refusals += 1
        log.warning("refused a device connection from %s (identity %r): %s", context.peer(), identity, why)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def Session(self, request_iterator, context):
        identity = peer_identity(context)
        assembly = Reassembly()
        hello = None
        for frame in request_iterator:
            hello = assembly.add(frame)
            if hello is not None:
                break
        if hello is None:
            return
        kind, body = decode(hello)
        device_id = body.get("device") if kind == "hello" and isinstance(body, dict) else None
        if not isinstance(device_id, int):
            self._refuse(context, identity, "the first message must be a hello naming the device")
        if identity != f"device-{device_id}":
            self._refuse(context, identity, f"says it is device {device_id} but its identity is {identity!r}")
        if device_id not in self.assigned:
            self._refuse(context, identity, f"device {device_id} is not assigned to this edge server")
        link = _Link(device_id)
        with self._changed:
            old = self._links.get(device_id)
            if old is not None:
                old.close()
            self._links[device_id] = link

        def read():
            parts = Reassembly()
            try:
                for frame in request_iterator:
                    payload = parts.add(frame)
                    if payload is None:
                        continue
                    if payload.kind == "ready":
                        link.ready.set()
                        with self._changed:
                            self._changed.notify_all()
                    else:
                        link.replies.put(payload)
            except grpc.RpcError:
                pass
            finally:
                link.closed = True
                link.replies.put(None)
                log.info("device %d: stream closed", device_id)

        threading.Thread(target=read, daemon=True, name=f"device-{device_id}-reader").start()
        log.info("device %d connected from %s", device_id, context.peer())
        yield from frames(encode("welcome", {**self.assigned[device_id], "config": self.config_text,
                                             "optimizer": self.optimizer}))
        while True:
            try:
                payload = link.outgoing.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():  # the device went away: free this thread
                    link.close()
                    return
                continue
            if payload is None:
                return
            yield from frames(payload)


class RemoteDevice:
    """A device role in another process, as the round engine sees it: each method is a call over its stream.
    Counts what crossed by kind, the way the simulator counts bytes (model weights, activations, gradients)."""

    def __init__(self, service: EdgeService, device, timeout_s: float, connect_s: float, faults: Counter,
                 wire: Counter) -> None:
        self.service, self.device, self.id = service, device, device.id
        self.timeout_s, self.connect_s = timeout_s, connect_s
        self.faults, self.wire = faults, wire
        self.lost = False
        self.tally: RoundTally | None = None  # what the edge saw of the device's round: its report if it is lost
        self._link: _Link | None = None

    def _call(self, method: str, **args):
        if self.lost:
            raise DeviceLost(f"device {self.id} is gone")
        if self._link is None:
            self._link = self.service.link(self.id, self.connect_s)
            if self._link is None:
                self._lose("device_absent", f"device {self.id} did not connect within {self.connect_s:.0f} s")
            self._frames_before = dict(self._link.frame_bytes)  # the link outlives the round
        try:
            kind, body = decode(self._link.call(encode("call", {"method": method, "args": args}), self.timeout_s))
        except DeviceLost as exc:
            self._lose("device_timeouts" if "answer" in str(exc) else "device_disconnects", str(exc))
        if kind == "error":
            self._lose("device_errors", f"device {self.id}: {method} failed on the device: {body}")
        return body

    def _lose(self, fault: str, why: str):
        self.lost = True
        self.faults[fault] += 1
        if self._link is not None:
            self._link.close()  # the device reconnects with a fresh stream: no late reply is mistaken for another
        log.warning("%s; it drops out of the round", why)
        raise DeviceLost(why)

    def frames(self) -> dict[str, int]:
        """Bytes of whole frames (serialized payloads) each way this round."""
        if self._link is None:
            return {}
        now, before = self._link.frame_bytes, self._frames_before
        return {"frames_up": now["up"] - before["up"], "frames_down": now["down"] - before["down"]}

    # ---- the DeviceSide the round engine drives

    def start_round(self, instructions, observer=None) -> list[int]:
        self.tally = RoundTally(assigned_cut=instructions.cut, cut=instructions.cut)
        step_sizes = self._call("start_round", instructions=instructions, observe=observer is not None)
        self.wire["model_down"] += _nbytes(t for state in instructions.weights.values() for t in state.values())
        return step_sizes

    def plan_step(self, clock_s: float):
        reply = self._call("plan_step", clock=clock_s)
        seen, plan = self.tally, reply["plan"]
        if plan is not None:
            plan = typed(DevicePlan, plan, f"device {self.id}'s plan")
        seen.cut = reply["cut"]
        seen.min_budget = reply["budget"] if seen.min_budget is None else min(seen.min_budget, reply["budget"])
        if plan is not None:
            seen.peak_predicted = max(seen.peak_predicted, plan.peak_bytes)
            seen.micro_batches.add(plan.micro_batch)
        if reply["handoff"] is not None:
            self.wire["handoff_up"] += _nbytes(t for state in reply["handoff"].weights.values() for t in state.values())
        return plan, reply["handoff"]

    def budget_returns_at(self, clock_s: float):
        return self._call("budget_returns_at", clock=clock_s)

    def paused(self) -> None:
        self.tally.pauses += 1
        self._call("paused")

    def dropped_out(self) -> None:
        if not self.lost:
            self._call("dropped_out")

    def begin_step(self, step: int) -> int:
        return self._call("begin_step", step=step)

    def forward(self, micro_batch: int):
        reply = self._call("forward", micro_batch=micro_batch)
        if reply["oom"]:
            raise DeviceOutOfMemory(f"device {self.id}: the memory guard stopped a forward")
        activation = reply["activation"]
        if activation is not None:
            self.wire["activations_up"] += _nbytes([activation.tensor])
            self.wire["labels_up"] += _nbytes([activation.labels])
        return activation

    def backward(self, gradient) -> None:
        self.wire["gradients_down"] += _nbytes([gradient.tensor])
        self._call("backward", gradient=gradient)

    def end_step(self) -> StepDone:
        done = typed(StepDone, self._call("end_step"), f"device {self.id}'s step")
        seen = self.tally
        seen.steps += 1
        seen.samples += done.samples
        seen.losses.append(done.loss)
        log.debug("device %d: step %d done, loss %.4f", self.id, seen.steps, done.loss)
        return done

    def take_back(self, handoff) -> None:
        if not self.lost:
            self._call("take_back", handoff=handoff)

    def finish_round(self, times: SimulatedTimes) -> DeviceResult:
        if not self.lost:
            try:
                result = self._call("finish_round", times=plain(times))
                if result.update is not None:
                    self.wire["model_up"] += _nbytes(t for state in result.update.units.values() for t in state.values())
                return result
            except DeviceLost:
                pass
        # gone: the device's units went with it; what the edge saw of it is its report
        self.tally.dropped_out = True
        return DeviceResult(None, self.tally.report(self.device, times, unread_budget=0), [])


def run_edge(server: str, listen: str, certs: Path | None, name: str, timeout_s: float = 60.0,
             connect_s: float = 120.0, retry_s: float = 300.0) -> None:
    """Serve as edge server ``name`` (``edge-<index>``): register with the central server at ``server``, let
    its devices connect on ``listen``, run every round the server hands out, until it says the run is over.
    Re-registers (and is handed its unfinished round again) when the server restarts."""
    channel = open_channel(server, certs, name)
    central = rpc.CentralStub(channel)
    meta = claimed(name)
    welcome = _call_retrying(lambda: central.Register(encode("register", {"edge": name}), metadata=meta), retry_s, server)
    _, info = decode(welcome)
    config = build_config(yaml.safe_load(info["config"]), source="the config the central server sent")
    index = info["edge"]
    profile = typed(ModelProfile, info["profile"], "the central server's model profile")
    spec = typed(EdgeSpec, info["spec"], "the central server's edge spec")
    optimizer = typed(OptimizerSpec, info["optimizer"], "the central server's optimizer")
    architecture = build_model(config.model.name, in_channels=info["input_shape"][0], num_classes=info["num_classes"],
                               width=config.model.width, input_size=info["input_shape"][1], seed=config.seed)
    import torch

    torch.set_num_threads(config.threads)
    strategy = make_strategy(config.strategy, len(architecture), config.seed)
    role = EdgeRole(index, architecture, optimizer)
    service = EdgeService(info["devices"], info["config"], info["optimizer"])
    grpc_server, port = start_server([lambda s: rpc.add_EdgeServicer_to_server(service, s)], listen, certs, name,
                                     workers=len(info["devices"]) + 8, unary=False)  # a stream holds a worker
    log.info("%s listening on port %d for devices %s", name, port, sorted(info["devices"]))
    try:
        while True:
            reply = _call_retrying(lambda: central.NextRound(encode("next", {"edge": name}), metadata=meta), retry_s, server)
            kind, work = decode(reply)
            if kind == "done":
                log.info("%s: the run is over", name)
                return
            if kind == "wait":
                continue
            result = _train_round(work, index, role, service, strategy, spec, profile, timeout_s, connect_s)
            try:
                central.FinishRound(encode("result", result), metadata=meta)
            except grpc.RpcError as exc:  # the server went away: it hands the round out again when it is back
                log.warning("%s: could not deliver round %d (%s); waiting for the server", name, work["round"] + 1,
                            exc.code().name)
    finally:
        service.close_all()
        grpc_server.stop(grace=2.0)
        channel.close()


def _train_round(work: dict, index: int, role: EdgeRole, service: EdgeService, strategy, spec: EdgeSpec,
                 profile: ModelProfile, timeout_s: float, connect_s: float) -> dict:
    """One round the central server handed out, run by the round engine over this edge's devices (each a
    ``RemoteDevice``); what the edge sends back: updates, results, faults and bytes on the wire."""
    started = time.perf_counter()
    faults, wire = Counter(), Counter()
    observer = strategy.step_observer() if work["observe"] else None
    role.start_round(work["edge"], observer)
    participants = [
        Participant(RemoteDevice(service, typed(Device, device, "a round's device"), timeout_s, connect_s, faults, wire),
                    instructions, 0, typed(AvailabilityTrace, availability, "a round's availability"))
        for instructions, device, availability in work["devices"]
    ]
    options = typed(EngineOptions, work["options"], "the round's engine options")
    outcome = train_round(participants, [role], [spec], profile, start_s=work["start_s"], deadline_s=work["deadline_s"],
                        options=options, observer=observer)
    for p in participants:
        wire.update(p.role.frames())
    return {"round": work["round"], "edge": index, "updates": outcome.updates[0], "results": outcome.results,
            "faults": dict(faults), "wire": dict(wire), "wall_s": time.perf_counter() - started}


def _call_retrying(call, retry_s: float, server: str):
    started = time.monotonic()
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.INVALID_ARGUMENT):
                raise SmartSplitError(f"the central server at {server} refused this edge: {exc.details()}") from None
            if time.monotonic() - started > retry_s:
                raise SmartSplitError(f"cannot reach the central server at {server} ({exc.code().name}); gave up "
                                      f"after {retry_s:.0f} s") from None
            time.sleep(1.0)
