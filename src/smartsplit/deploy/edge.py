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

import dataclasses
import logging
import math
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import torch
import yaml

from smartsplit.config import Config, DeploymentConfig, build_config
from smartsplit.deploy import smartsplit_pb2_grpc as rpc
from smartsplit.deploy.certs import identity_of
from smartsplit.deploy.link import ShapedLink, claimed, open_channel, peer_identity, start_server
from smartsplit.deploy.checks import (
    OBSERVATION_NUMBERS, Impersonation, Malformed, ModelShapes, check_int, check_number, check_observations,
    check_sender,
)
from smartsplit.deploy.wire import Reassembly, WireError, decode, encode, frames, plain, typed
from smartsplit.engine.freerun import run_free
from smartsplit.engine.round import Participant, assemble, train_round
from smartsplit.errors import DeviceLost, SmartSplitError
from smartsplit.fleet import AvailabilityTrace, Device
from smartsplit.fleet.clock import EdgeSpec
from smartsplit.memory.ondevice import DevicePlan
from smartsplit.models.profile import ModelProfile
from smartsplit.kernels.saved import DeviceOutOfMemory
from smartsplit.kernels.structure import in_memory_format
from smartsplit.models.zoo import build_model
from smartsplit.roles.device import OptimizerSpec, RoundTally, SimulatedTimes, StepDone, local_batches
from smartsplit.strategies.options import EngineOptions
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import DeviceResult, UnitHandoff
from smartsplit.strategies import make_strategy

log = logging.getLogger(__name__)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


MAX_STREAMS = 2  # open streams per device identity: a reconnecting device overlaps its old stream briefly
HELLO_S = 10.0  # a stream that has not said hello by then is closed
HELLO_BYTES = 64 << 10  # the most a hello may take


class _Link:
    """One device's stream, seen from the edge: calls go out, replies come in; the bytes that crossed. A reply
    nobody asked for, or one that cannot be read, ends the link: the call waiting on it learns why."""

    def __init__(self, device_id: int) -> None:
        self.device_id = device_id
        self.outgoing: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.closed = False  # the stream ended, or the edge gave up on it: the device must connect again
        self.awaiting = False  # a call is out and its reply not yet in
        self.limit = 0  # the most bytes the reply due may take (set per call from the plan)
        self.frame_bytes = {"up": 0, "down": 0}
        self._lock = threading.Lock()

    def call(self, payload, timeout_s: float):
        self.frame_bytes["down"] += payload.ByteSize()
        with self._lock:
            self.awaiting = True
        self.outgoing.put(payload)
        try:
            reply = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            raise DeviceLost(f"device {self.device_id} did not answer within {timeout_s:.0f} s") from None
        finally:
            with self._lock:
                self.awaiting = False
        if reply is None:
            raise DeviceLost(f"device {self.device_id} disconnected")
        if isinstance(reply, WireError):
            raise reply
        self.frame_bytes["up"] += reply.ByteSize()
        return reply

    def deliver(self, payload) -> None:
        """A payload from the device: the reply to the call that is out, or a fault that ends the link."""
        with self._lock:
            expected = self.awaiting
            self.awaiting = False
        self.replies.put(payload if expected else WireError(f"a {payload.kind[:40]!r} message nobody asked for"))
        if not expected:
            self.close()

    def close(self, farewell=None) -> None:
        self.closed = True
        if farewell is not None:
            self.outgoing.put(farewell)
        self.outgoing.put(None)
        self.replies.put(None)


class EdgeService(rpc.EdgeServicer):
    """The devices' side of the edge: authenticates each stream and keeps the latest link per device.

    A stream is refused before anything is read from it unless its certificate names a device assigned to this
    edge with fewer than ``MAX_STREAMS`` streams open; it must say hello within ``HELLO_S`` seconds, in at most
    ``HELLO_BYTES``; after that no message may exceed ``message_limit`` (set from the model) and every one must
    answer a call. Each refusal is logged here with the peer's identity and the reason; the peer is told only
    that it was refused."""

    def __init__(self, assigned: dict[int, dict], welcome: dict, step_sizes: dict[int, list[int]],
                 message_limit: int) -> None:
        self.assigned = assigned  # device id -> what only that device may know (Device, its examples, its trace)
        self.welcome = welcome  # what every device is told: the config as a device sees it, the optimizer, ...
        self.step_sizes = step_sizes  # device id -> examples in each of its local steps (from its shard)
        self.message_limit = message_limit  # the most one message of a round may take
        self._links: dict[int, _Link] = {}
        self._streams: Counter = Counter()  # open streams per device id
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
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by the edge server (its log says why)")

    def _admit(self, context) -> int:
        """The device the stream's certificate names, if it may open one more stream; else the stream ends."""
        identity = peer_identity(context)
        kind, number = _identity(identity)
        if kind != "device" or number not in self.assigned:
            self._refuse(context, identity, "not a device assigned to this edge server")
        with self._changed:
            if self._streams[number] >= MAX_STREAMS:
                refused = True
            else:
                refused = False
                self._streams[number] += 1
        if refused:
            self._refuse(context, identity, f"already holds {MAX_STREAMS} open streams")
        return number

    def _hello(self, request_iterator, context, device_id: int) -> bool:
        """Reads the stream's hello (bounded in time and size); False when it ended first."""
        timer = threading.Timer(HELLO_S, context.cancel)
        timer.start()
        try:
            assembly = Reassembly(HELLO_BYTES)
            for frame in request_iterator:
                hello = assembly.add(frame)
                if hello is not None:
                    kind, body = decode(hello)
                    if kind != "hello" or not isinstance(body, dict) or body.get("device") != device_id:
                        raise WireError(f"a {kind[:40]!r} message where a hello naming device {device_id} was due")
                    return True
            return False
        except WireError as exc:
            self._refuse(context, f"device-{device_id}", str(exc))
        finally:
            timer.cancel()

    def Session(self, request_iterator, context):
        device_id = self._admit(context)
        try:
            if not self._hello(request_iterator, context, device_id):
                return
            link = _Link(device_id)
            with self._changed:
                old = self._links.get(device_id)
                if old is not None:
                    old.close()
                self._links[device_id] = link
            threading.Thread(target=self._read, args=(request_iterator, link), daemon=True,
                             name=f"device-{device_id}-reader").start()
            log.info("device %d connected from %s", device_id, context.peer())
            yield from frames(encode("welcome", {**self.assigned[device_id], **self.welcome}))
            yield from self._send(link, context)
        finally:
            with self._changed:
                self._streams[device_id] -= 1

    def _read(self, request_iterator, link: _Link) -> None:
        parts = Reassembly(self.message_limit)
        try:
            for frame in request_iterator:
                parts.limit = max(link.limit, self.message_limit)
                payload = parts.add(frame)
                if payload is None:
                    continue
                if payload.kind == "ready" and not link.ready.is_set():
                    link.ready.set()
                    with self._changed:
                        self._changed.notify_all()
                else:
                    link.deliver(payload)
        except WireError as exc:
            log.warning("device %d sent what this edge will not read (%s); its stream is closed", link.device_id, exc)
            link.replies.put(exc)
        except grpc.RpcError:
            pass
        finally:
            link.closed = True
            link.replies.put(None)
            log.info("device %d: stream closed", link.device_id)

    @staticmethod
    def _send(link: _Link, context):
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


def _identity(name: str | None) -> tuple[str | None, int | None]:
    try:
        return identity_of(name or "")
    except SmartSplitError:
        return None, None


# the calls whose messages carry what a real device's link would (weights, activations, gradients, updates):
# only these pay the link's latency when links are shaped; the rest stand for work a real device does at home
_DATA_DOWN = frozenset({"start_round", "backward", "take_back"})
_DATA_UP = frozenset({"forward", "plan_step", "finish_round"})


class RemoteDevice:
    """A device role in another process, as the round engine sees it: each method is a call over its stream.

    Every reply is checked against the plan before the edge uses it (``checks``): the units and shapes its cut
    implies, the step and micro-batch under way, finite values, and the device's own id, which its certificate
    proved. A reply that fails costs that device only: it drops out of the round with a fault naming why
    (``device_malformed``, ``device_impersonation``), and the round goes on. Counts what crossed by kind, the way
    the simulator counts bytes (model weights, activations, gradients)."""

    def __init__(self, service: EdgeService, device, timeout_s: float, connect_s: float, faults: Counter,
                 wire: Counter, shapes: ModelShapes, step_sizes: list[int], shaper: ShapedLink | None = None,
                 assigned_cut: int | None = None) -> None:
        self.service, self.device, self.id = service, device, device.id
        self.shaper = shaper  # the device's link, emulated (None: as fast as the network here goes)
        self.timeout_s, self.connect_s = timeout_s, connect_s
        self.faults, self.wire = faults, wire
        self.shapes, self.step_sizes = shapes, step_sizes
        self.lost = False
        # what the edge saw of the device's round: its report if it is lost (from the round's start, when its cut
        # is known: a device lost before its download is reported too)
        self.tally: RoundTally | None = None if assigned_cut is None else RoundTally(assigned_cut=assigned_cut,
                                                                                      cut=assigned_cut)
        self._link: _Link | None = None
        self._plan: DevicePlan | None = None
        self._step = -1
        self._micro_batches = 0

    def _call(self, method: str, check=None, limit: int = 0, **args):
        """The device's reply to ``method(**args)``, passed through ``check`` (which may raise ``Malformed``); a
        reply may take the service's message limit, or ``limit`` bytes where that is more."""
        if self.lost:
            raise DeviceLost(f"device {self.id} is gone")
        if self._link is None:
            self._link = self.service.link(self.id, self.connect_s)
            if self._link is None:
                self._lose("device_absent", f"device {self.id} did not connect within {self.connect_s:.0f} s")
            self._frames_before = dict(self._link.frame_bytes)  # the link outlives the round
        self._link.limit = limit
        try:
            payload = encode("call", {"method": method, "args": args})
            if self.shaper is not None:
                self.shaper.down(payload.ByteSize(), data=method in _DATA_DOWN)
            reply = self._link.call(payload, self.timeout_s)
            if self.shaper is not None:
                self.shaper.up(reply.ByteSize(), data=method in _DATA_UP)
            kind, body = decode(reply)
            if kind == "error":
                self._lose("device_errors", f"device {self.id}: {method} failed on the device: {str(body)[:300]}")
            if kind != "reply":
                raise Malformed(f"a {kind[:40]!r} message where a reply was due")
            return check(body) if check is not None else _expect_none(body)
        except DeviceLost as exc:
            if self.lost:
                raise
            self._lose("device_timeouts" if "answer" in str(exc) else "device_disconnects", str(exc))
        except Impersonation as exc:
            self._lose("device_impersonation", f"device {self.id}'s {method}: {exc}")
        except (Malformed, WireError) as exc:
            self._lose("device_malformed", f"device {self.id}'s {method}: {exc}")

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
        self._observing = observer is not None

        def check(sizes):
            if sizes != self.step_sizes:
                raise Malformed(f"local steps of {str(sizes)[:80]} examples; its shard makes {self.step_sizes[:8]}")
            return sizes

        step_sizes = self._call("start_round", check, instructions=instructions, observe=observer is not None)
        self.wire["model_down"] += _nbytes(t for state in instructions.weights.values() for t in state.values())
        return step_sizes

    def plan_step(self, clock_s: float):
        plan, handoff, budget = self._call("plan_step", self._checked_plan, clock=clock_s)
        seen = self.tally
        seen.min_budget = budget if seen.min_budget is None else min(seen.min_budget, budget)
        if plan is not None:
            self._plan = plan
            seen.cut = plan.cut
            seen.peak_predicted = max(seen.peak_predicted, plan.peak_bytes)
            seen.micro_batches.add(plan.micro_batch)
        if handoff is not None:
            self.wire["handoff_up"] += _nbytes(t for state in handoff.weights.values() for t in state.values())
        return plan, handoff

    def _checked_plan(self, reply) -> tuple[DevicePlan | None, UnitHandoff | None, int]:
        if not isinstance(reply, dict) or set(reply) != {"plan", "handoff", "cut", "budget"}:
            raise Malformed(f"a plan reply with fields {sorted(reply)[:6] if isinstance(reply, dict) else reply!r}")
        now = self.tally.cut
        cut = check_int(reply["cut"], "its cut", 1, now)
        budget = check_int(reply["budget"], "its budget", 0, 1 << 62)
        plan = None if reply["plan"] is None else typed(DevicePlan, reply["plan"], "its plan")
        if plan is not None:
            check_int(plan.cut, "its plan's cut", cut, cut)
            check_int(plan.micro_batch, "its plan's micro-batch", 1, self.shapes.batch_size)
            if any(not 1 <= a <= b <= cut for a, b in plan.segments):
                raise Malformed(f"its plan checkpoints segments {plan.segments[:4]} outside units 1..{cut}")
        handoff = reply["handoff"]
        if cut < now:
            self.shapes.check_handoff(handoff, self.id, range(cut + 1, now + 1), "its hand-off")
        elif handoff is not None:
            raise Malformed("a hand-off without a shallower cut")
        if plan is None and cut != now:
            raise Malformed("a new cut without a plan")
        return plan, handoff, budget

    def budget_returns_at(self, clock_s: float):
        def check(when):
            if when is not None:
                check_number(when, "when its budget returns", low=clock_s)
            return when

        return self._call("budget_returns_at", check, clock=clock_s)

    def paused(self) -> None:
        self.tally.pauses += 1
        self._call("paused")

    def dropped_out(self) -> None:
        if not self.lost:
            self._call("dropped_out")

    def begin_step(self, step: int) -> int:
        size, plan = self.step_sizes[step], self._plan
        due = -(-size // plan.micro_batch)

        def check(count):
            return check_int(count, "its micro-batches", 0 if count == 0 else due, due)

        self._step, self._micro_batches = step, self._call("begin_step", check, step=step)
        return self._micro_batches

    def forward(self, micro_batch: int):
        def check(reply):
            if not isinstance(reply, dict) or set(reply) != {"activation", "oom"} or not isinstance(reply["oom"], bool):
                raise Malformed("a forward reply that is not {activation, oom}")
            activation = reply["activation"]
            if reply["oom"] or self._plan.cut == self.shapes.num_units:
                if activation is not None:
                    raise Malformed("an activation where none was due")
                return reply
            size, step = self.step_sizes[self._step], self._plan.micro_batch
            self.shapes.check_activation(activation, device_id=self.id, step=self._step, micro_batch=micro_batch,
                                         examples=min(step, size - micro_batch * step), cut=self._plan.cut,
                                         batch=size, last=micro_batch == self._micro_batches - 1)
            return reply

        reply = self._call("forward", check, micro_batch=micro_batch)
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
        size = self.step_sizes[self._step]

        def check(reply):
            done = typed(StepDone, reply, "its step")
            check_int(done.samples, "its step's examples", size, size)
            check_number(done.loss, "its step's loss")
            return done

        done = self._call("end_step", check)
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
                seen = self.tally
                observations = seen.steps * seen.assigned_cut * (8 * OBSERVATION_NUMBERS + 256) if self._observing else 0
                result = self._call("finish_round", self._checked_result, limit=self.service.message_limit + observations,
                                    times=plain(times))
                if result.update is not None:
                    self.wire["model_up"] += _nbytes(t for state in result.update.units.values() for t in state.values())
                # the round's times are the edge's (simulated, or measured here): never the device's word for them,
                # which learned profiles and the strategy's speed estimates would otherwise take
                report = dataclasses.replace(result.report, **dataclasses.asdict(times))
                return DeviceResult(result.update, report, result.observations)
            except DeviceLost:
                pass
        # gone: the device's units went with it; what the edge saw of it is its report
        self.tally.dropped_out = True
        return DeviceResult(None, self.tally.report(self.device, times, unread_budget=0), [])

    def _checked_result(self, result) -> DeviceResult:
        """Its report names it and the steps the edge saw; its update holds its assigned units, finite, trained on
        the examples the edge counted; its observations are of its own units and steps."""
        seen = self.tally
        if not isinstance(result, DeviceResult):
            raise Malformed(f"a {type(result).__name__} where its result was due")
        check_sender(result.report.device, self.id, "its report")
        if (result.report.cut, result.report.steps, result.report.samples) != (seen.assigned_cut, seen.steps, seen.samples):
            raise Malformed(f"its report says cut {result.report.cut}, {result.report.steps} steps, "
                            f"{result.report.samples} examples; the edge saw {seen.assigned_cut}, {seen.steps}, "
                            f"{seen.samples}")
        units = range(1, seen.assigned_cut + 1)
        if (result.update is None) != (seen.steps == 0):
            raise Malformed("an update without steps, or steps without an update")
        if result.update is not None:
            self.shapes.check_update(result.update, units, seen.samples, "its update")
        check_observations(result.observations, seen.steps if self._observing else 0, units, "its observations")
        return result


def _expect_none(body) -> None:
    if body is not None:
        raise Malformed(f"a {type(body).__name__} where nothing was due")


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
    architecture = in_memory_format(build_model(
        config.model.name, in_channels=info["input_shape"][0], num_classes=info["num_classes"], width=config.model.width,
        input_size=info["input_shape"][1], seed=config.seed), config.memory_format)
    torch.set_num_threads(config.threads)
    strategy = make_strategy(config.strategy, len(architecture), config.seed)
    role = EdgeRole(index, architecture, optimizer)
    shapes = ModelShapes.of(architecture, tuple(info["input_shape"]), info["num_classes"], config.training.batch_size)
    service = _device_service(config, info, architecture, strategy, shapes.message_limit(optimizer.slots))
    grpc_server, port = start_server([lambda s: rpc.add_EdgeServicer_to_server(service, s)], listen, certs, name,
                                     workers=MAX_STREAMS * len(info["devices"]) + 8, unary=False)  # a stream holds a worker
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
            result = _train_round(work, index, role, service, strategy, spec, profile, shapes, timeout_s, connect_s,
                                  config.deployment)
            try:
                central.FinishRound(encode("result", result), metadata=meta)
            except grpc.RpcError as exc:  # the server went away: it hands the round out again when it is back
                log.warning("%s: could not deliver round %d (%s); waiting for the server", name, work["round"] + 1,
                            exc.code().name)
    finally:
        service.close_all()
        grpc_server.stop(grace=2.0).wait(5.0)  # its threads end before the interpreter does (else std::terminate)
        channel.close()


def _device_service(config: Config, info: dict, architecture, strategy, message_limit: int) -> EdgeService:
    """What the edge tells its devices, and how it checks them: each device's welcome holds its own examples,
    its budget trace, the device's view of the config and, for the MEC manager, the sketch coordinates (never
    the seed they come from)."""
    t = config.training
    step_sizes = {d: [len(b) for b in local_batches(np.arange(len(a["y"])), t.batch_size, t.local_steps,
                                                    t.local_epochs, None)] for d, a in info["devices"].items()}
    sketcher = getattr(strategy.step_observer(), "sketcher", None)
    sketch = None if sketcher is None else {i: tuple(torch.from_numpy(a) for a in positions)
                                            for i, positions in sketcher.layout(architecture).items()}
    welcome = {"config": device_view(config), "optimizer": info["optimizer"], "num_classes": info["num_classes"],
               "sketch": sketch}
    return EdgeService(info["devices"], welcome, step_sizes, message_limit)


def device_view(config: Config) -> str:
    """The config as a device sees it: what it needs to train its units, and nothing from which another device's
    data could be recomputed (no seed, no partition settings, no fleet)."""
    raw = config.model_dump(mode="json")
    raw.update(name="device", seed=0)
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("partition", "alpha", "shards_per_client")}
    raw["fleet"] = {"devices": 1, "budgets": {"resolution": config.fleet.budgets.resolution}}
    raw["training"]["devices_per_round"] = 1
    return yaml.safe_dump(raw, sort_keys=False)


def _shaper(device: Device, pace: DeploymentConfig, spec: EdgeSpec) -> ShapedLink | None:
    if not pace.shape_links:
        return None
    if pace.kernel_links:  # tbf holds the device's link to its bandwidth: the link layer adds the latency
        return ShapedLink(math.inf, math.inf, spec.latency_s, pace.time_scale)
    return ShapedLink(device.downlink_bytes_per_s, device.uplink_bytes_per_s, spec.latency_s, pace.time_scale)


def _train_round(work: dict, index: int, role: EdgeRole, service: EdgeService, strategy, spec: EdgeSpec,
                 profile: ModelProfile, shapes: ModelShapes, timeout_s: float, connect_s: float,
                 pace: DeploymentConfig) -> dict:
    """One round the central server handed out, run by the round engine over this edge's devices (each a
    ``RemoteDevice``), in lockstep with the simulated clock or at their own pace (``pace``); what the edge sends
    back: updates, results, faults and bytes on the wire."""
    started = time.perf_counter()
    faults, wire = Counter(), Counter()
    observer = strategy.step_observer() if work["observe"] else None
    role.start_round(work["edge"], observer)
    participants = []
    for instructions, device, availability in work["devices"]:
        device = typed(Device, device, "a round's device")
        shaper = _shaper(device, pace, spec)
        remote = RemoteDevice(service, device, timeout_s, connect_s, faults, wire, shapes,
                              service.step_sizes[instructions.device_id], shaper, instructions.cut)
        online = typed(AvailabilityTrace, availability, "a round's availability")
        link_s = (lambda s=shaper: s.busy_s) if shaper is not None else None
        participants.append(Participant(remote, instructions, 0, online, link_s=link_s))
    options = typed(EngineOptions, work["options"], "the round's engine options")
    if pace.pace == "free":
        outcome = assemble(run_free(participants, [role], profile, work["start_s"], pace.round_wall_s, pace.time_scale,
                                    observer), 1)
    else:
        outcome = train_round(participants, [role], [spec], profile, start_s=work["start_s"],
                              deadline_s=work["deadline_s"], options=options, observer=observer)
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
