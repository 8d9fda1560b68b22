"""The device process: its own data shard, memory budget, on-device manager and memory meter, over one stream
to its edge server.

The device says hello; the edge answers with what the central server knows of it (its hardware class, the
indices of its shard, its budget trace, the run's config), and from then on calls the device role's methods
at the simulated moments the round engine schedules them: the device answers each call with its result
(an ``Activation`` per micro-batch going up, a ``Gradient`` coming down). Examples never leave the device:
it loads them from its own copy of the data set. Where the heap meter's counter is preloaded into this process
(``smartsplit device`` does that unless ``--no-meter``), each real step's peak is read from it: the bytes the
process's heap held above what it held before the round's units were loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from smartsplit.config import build_config
from smartsplit.data import load_data
from smartsplit.deploy import smartsplit_pb2_grpc as rpc
from smartsplit.deploy.limits import AvailableMemoryTrace, FixedBudget, enforce_budget, idle_footprint
from smartsplit.deploy.link import claimed, open_channel
from smartsplit.deploy.wire import Reassembly, decode, encode, frames, plain, typed
from smartsplit.engine.build import build_architecture, device_manager, start_meter
from smartsplit.errors import SmartSplitError
from smartsplit.models.profile import ProfileCache
from smartsplit.records import MB
from smartsplit.fleet import BudgetTrace, Device
from smartsplit.roles.device import DeviceRole, OptimizerSpec, SimulatedTimes
from smartsplit.strategies import make_strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceOptions:
    budget: str = "trace"  # "trace" (the one the server sends), "available" (what the OS says), or bytes
    data_root: str | None = None  # where this device's copy of the data set lives (default: the config's)
    enforce_budget: bool = False  # run under a kernel memory limit of the idle footprint plus the budget
    retry_s: float = 120.0  # how long to keep trying to reach the edge before giving up


class _HeapCounter:
    """The preloaded heap meter's counter in this very process (None where it is not preloaded)."""

    def __init__(self) -> None:
        from smartsplit.meter.heap import Heap

        self.heap = Heap()
        self.baseline = 0

    @classmethod
    def here(cls) -> _HeapCounter | None:
        if "heapmeter" not in os.environ.get("LD_PRELOAD", ""):
            return None
        return cls()


class _Device:
    """The device role behind the stream: builds it from the edge's welcome, then answers calls."""

    def __init__(self, device_id: int, options: DeviceOptions) -> None:
        self.id, self.options = device_id, options
        self.role: DeviceRole | None = None
        self.strategy = None
        self.counter = _HeapCounter.here()
        self.limit = None  # the kernel memory limit it runs under (--enforce-budget)
        self.budget = 0

    def welcome(self, info: dict) -> None:
        if self.role is not None:
            return  # a reconnection: the role (and any round under way) carries on
        raw = yaml.safe_load(info["config"])
        if self.options.data_root is not None:
            raw.setdefault("data", {})["root"] = self.options.data_root
        config = build_config(raw, source=f"the config the edge sent device {self.id}")
        train, _ = load_data(config)
        architecture = build_architecture(config, train)
        meter = start_meter(config) if config.meter else None
        optimizer = typed(OptimizerSpec, info["optimizer"], "the welcome's optimizer")
        profiles = ProfileCache(meter, (optimizer.name, optimizer.lr, optimizer.momentum))

        def profile_at(batch: int):
            return profiles.get(config.model.name, architecture, train.shape, batch)

        self.strategy = make_strategy(config.strategy, len(architecture), config.seed)
        device = typed(Device, info["device"], "the welcome's device")
        trace = _budget(self.options.budget, typed(BudgetTrace, info["trace"], "the welcome's budget trace"))
        manager = device_manager(config, profile_at, optimizer, device, self.strategy.rules.checkpointing)
        measure = self._real_peak if self.counter is not None and config.meter else None
        t = config.training
        self.role = DeviceRole(device, train, info["shard"], trace, manager, architecture, optimizer, t.batch_size,
                               t.local_steps, t.local_epochs, measure=measure)
        import torch

        torch.set_num_threads(config.threads)
        if self.options.enforce_budget:
            self._enforce(trace.at(0.0))
        log.info("device %d ready: %s, %d examples, budget %s", self.id, device.device_class, len(info["shard"]),
                 self.options.budget)

    def _enforce(self, budget: int) -> None:
        """Limit this process to its idle footprint (what it held when it was ready) plus ``budget``."""
        if self.limit is None:
            self.limit = enforce_budget(budget, name=f"device-{self.id}", above_usage=True)
            self.budget = budget
            log.info("device %d: kernel memory limit %.1f MB (its footprint when ready %.1f MB, as charged to the "
                     "cgroup, + budget %.1f MB; resident set %.1f MB)", self.id, self.limit.limit / MB,
                     self.limit.base / MB, budget / MB, idle_footprint() / MB)
        elif budget != self.budget:
            base = self.limit.base
            self.limit = enforce_budget(base + budget, name=f"device-{self.id}")
            self.limit = dataclasses.replace(self.limit, base=base)
            self.budget = budget
            log.info("device %d: kernel memory limit now %.1f MB (budget %.1f MB)", self.id, self.limit.limit / MB,
                     budget / MB)

    def close(self) -> None:
        if self.limit is not None:
            self.limit.leave()

    def _real_peak(self, plan) -> int:
        return max(self.counter.heap.peak() - self.counter.baseline, 0)

    def call(self, method: str, args: dict) -> Any:
        role = self.role
        if method == "start_round":
            if self.counter is not None:
                self.counter.baseline = self.counter.heap.live()
            observer = self.strategy.step_observer() if args["observe"] else None
            return role.start_round(args["instructions"], observer)
        if method == "plan_step":
            plan, handoff = role.plan_step(args["clock"])
            budget = role.trace.at(args["clock"])
            if self.limit is not None:
                self._enforce(budget)
            return {"plan": plain(plan) if plan is not None else None, "handoff": handoff, "cut": role.cut,
                    "budget": budget}
        if method == "begin_step":
            if self.counter is not None:
                self.counter.heap.reset_peak()
            return role.begin_step(args["step"])
        if method == "forward":
            from smartsplit.kernels.saved import DeviceOutOfMemory

            try:
                return {"activation": role.forward(args["micro_batch"]), "oom": False}
            except DeviceOutOfMemory:
                return {"activation": None, "oom": True}
        simple = {"budget_returns_at": lambda: role.budget_returns_at(args["clock"]), "paused": role.paused,
                  "dropped_out": role.dropped_out, "backward": lambda: role.backward(args["gradient"]),
                  "end_step": lambda: plain(role.end_step()), "take_back": lambda: role.take_back(args["handoff"]),
                  "finish_round": lambda: role.finish_round(typed(SimulatedTimes, args["times"], "finish_round's times"))}
        if method not in simple:
            raise SmartSplitError(f"the edge called {method!r}, which this device does not know; are both ends "
                                  "running the same SmartSplit version?")
        return simple[method]()


def _budget(spec: str, trace):
    if spec == "trace":
        return trace
    if spec == "available":
        return AvailableMemoryTrace()
    try:
        return FixedBudget(int(float(spec)))
    except ValueError:
        raise SmartSplitError(f"--budget {spec!r}: give 'trace', 'available' or a number of bytes") from None


def run_device(edge: str, device_id: int, certs: Path | None, options: DeviceOptions = DeviceOptions()) -> None:
    """Serve as device ``device_id`` through the edge at ``edge`` until the run ends. Reconnects when the link
    drops (an edge restarting); gives up after ``options.retry_s`` without reaching it."""
    me = _Device(device_id, options)
    try:
        _serve(edge, certs, f"device-{device_id}", me, options)
    finally:
        me.close()


def _serve(edge: str, certs: Path | None, name: str, me: _Device, options: DeviceOptions) -> None:
    last_contact = time.monotonic()
    while True:
        try:
            if _session(edge, certs, name, me):
                return
            last_contact = time.monotonic()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise SmartSplitError(f"the edge at {edge} refused {name}: {exc.details()}") from None
            if me.role is not None:
                last_contact = max(last_contact, time.monotonic() - 1.0)
            if time.monotonic() - last_contact > options.retry_s:
                raise SmartSplitError(f"{name}: cannot reach the edge at {edge} ({code.name}: {exc.details()}); "
                                      f"gave up after {options.retry_s:.0f} s") from None
            log.info("%s: edge at %s unreachable (%s); retrying", name, edge, code.name)
            time.sleep(1.0)


def _session(edge: str, certs: Path | None, name: str, me: _Device) -> bool:
    """One stream to the edge; True when the edge said the run is over."""
    outgoing: queue.Queue = queue.Queue()

    def requests():
        while True:
            payload = outgoing.get()
            if payload is None:
                return
            yield from frames(payload)

    with open_channel(edge, certs, name, unary=False) as channel:
        stub = rpc.EdgeStub(channel)
        outgoing.put(encode("hello", {"device": me.id}))
        assembly = Reassembly()
        try:
            for frame in stub.Session(requests(), metadata=claimed(name), wait_for_ready=False):
                payload = assembly.add(frame)
                if payload is None:
                    continue
                kind, body = decode(payload)
                if kind == "welcome":
                    me.welcome(body)
                    outgoing.put(encode("ready"))
                elif kind == "call":
                    try:
                        reply = encode("reply", me.call(body["method"], body["args"]))
                    except Exception as exc:  # the edge drops this device for the round and logs why
                        log.exception("%s: %s failed", name, body["method"])
                        reply = encode("error", f"{type(exc).__name__}: {exc}")
                    outgoing.put(reply)
                elif kind == "bye":
                    log.info("%s: the run is over", name)
                    return True
        finally:
            outgoing.put(None)
    return False
