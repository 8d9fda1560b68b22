"""The device process: its own examples, memory budget, on-device manager and memory meter, over one stream
to its edge server.

The device says hello; the edge answers with what a device may know (its hardware class, its own examples, its
budget trace, the config as a device sees it: no seed, no partition, no fleet), and from then on calls the
device role's methods at the simulated moments the round engine schedules them: the device answers each call
with its result (an ``Activation`` per micro-batch going up, a ``Gradient`` coming down). Every call is checked
before the role sees it (``checks``). Where the heap meter's counter is preloaded into this process
(``smartsplit device`` does that unless ``--no-meter``), each real step's peak is read from it: the bytes the
process's heap held above what it held before the round's units were loaded.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import yaml

from smartsplit.config import build_config
from smartsplit.data import Dataset
from smartsplit.deploy import smartsplit_pb2_grpc as rpc
from smartsplit.deploy.limits import AvailableMemoryTrace, FixedBudget, enforce_budget, idle_footprint
from smartsplit.deploy.link import claimed, open_channel
from smartsplit.deploy.checks import Malformed, ModelShapes, check_int, check_number, check_sender
from smartsplit.deploy.wire import WELCOME_BYTES, Reassembly, WireError, decode, encode, frames, plain, typed
from smartsplit.kernels.saved import DeviceOutOfMemory
from smartsplit.kernels.structure import warm_up
from smartsplit.messages import RoundInstructions
from smartsplit.engine.build import build_architecture, device_manager, start_meter
from smartsplit.errors import SmartSplitError
from smartsplit.models.profile import ProfileCache
from smartsplit.records import MB
from smartsplit.fleet import BudgetTrace, Device
from smartsplit.roles.device import DeviceRole, OptimizerSpec, SimulatedTimes
from smartsplit.strategies import make_strategy
from smartsplit.strategies.mec import GradientSketches, UpdateSketcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceOptions:
    budget: str = "trace"  # "trace" (the one the server sends), "available" (what the OS says), or bytes
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
        self.shapes: ModelShapes | None = None  # what the edge's messages must look like, once welcomed
        self.message_limit = WELCOME_BYTES  # until it knows the model
        self.sketch = self.architecture = None
        self.pending = None  # the activation sent, whose gradient is due
        self.assigned_cut = self.step_count = self.micro_batches = 0  # of the round and the step under way

    def welcome(self, info: dict) -> None:
        """Build the device role from what its edge says: the config as a device sees it, its own examples, its
        budget trace, the optimizer and (for the MEC manager) the sketch coordinates. Nothing in it says how other
        devices' data was drawn."""
        if self.role is not None:
            return  # a reconnection: the role (and any round under way) carries on
        config = build_config(yaml.safe_load(info["config"]), source=f"the config the edge sent device {self.id}")
        train = _own_examples(info)
        architecture = build_architecture(config, train, structure_only=True)  # no weights: they come each round
        meter = start_meter(config) if config.meter else None
        optimizer = typed(OptimizerSpec, info["optimizer"], "the welcome's optimizer")
        profiles = ProfileCache(meter, (optimizer.name, optimizer.lr, optimizer.momentum))

        def profile_at(batch: int):
            return profiles.get(config.model.name, architecture, train.shape, batch)

        self.strategy = make_strategy(config.strategy, len(architecture), config.seed)
        self.sketch = info.get("sketch")
        self.architecture = architecture
        device = typed(Device, info["device"], "the welcome's device")
        trace = _budget(self.options.budget, typed(BudgetTrace, info["trace"], "the welcome's budget trace"))
        manager = device_manager(config, profile_at, optimizer, device, self.strategy.rules.checkpointing)
        # the step's real peak: the heap counter preloaded here, else the kernel's charge under --enforce-budget
        measure = self._real_peak if (self.counter is not None and config.meter) or self.options.enforce_budget else None
        t = config.training
        self.role = DeviceRole(device, train, np.arange(len(train)), trace, manager, architecture, optimizer,
                               t.batch_size, t.local_steps, t.local_epochs, measure=measure)
        self.shapes = ModelShapes.of(architecture, train.shape, train.num_classes, t.batch_size)
        self.message_limit = self.shapes.message_limit(optimizer.slots)
        torch.set_num_threads(config.threads)
        if self.options.enforce_budget:
            if self.strategy.rules.replan:  # a baseline runs its plain plan whatever the budget says
                self._refuse_unplannable(manager, len(architecture), trace.at(0.0))
            warm_up(architecture, train.shape, t.batch_size)  # the runtime's one-time growth: footprint, not budget
            self._enforce(trace.at(0.0))
        log.info("device %d ready: %s, %d examples, budget %s", self.id, device.device_class, len(train),
                 self.options.budget)

    def observer(self):
        """The strategy's step observer; the MEC manager's sketches at the coordinates the edge sent."""
        if self.sketch is None:
            return self.strategy.step_observer()
        layout = {i: tuple(a.numpy() for a in positions) for i, positions in self.sketch.items()}
        return GradientSketches(UpdateSketcher.from_layout(self.architecture, layout))

    def _refuse_unplannable(self, manager, num_units: int, budget: int) -> None:
        """Under a kernel limit, a budget no plan fits would end in the kernel killing this process mid-step: a
        strategy that plans to the budget refuses it now, in words."""
        if manager.deepest_fitting_cut(num_units, budget) is None:
            raise SmartSplitError(
                f"device {self.id}: a budget of {budget / MB:.1f} MB holds no training plan at any cut, even cut 1 with "
                "every unit recomputed; give it more memory (--budget) or run without --enforce-budget")

    def _enforce(self, budget: int) -> None:
        """Limit this process to its idle footprint (what it held when it was ready) plus ``budget``."""
        if self.limit is None:
            self.limit = enforce_budget(budget, name=f"device-{self.id}", above_usage=True)
            self.budget = budget
            log.info("device %d: kernel memory limit %.1f MB (its footprint when ready %.1f MB, as charged to the "
                     "cgroup, + budget %.1f MB; resident set %.1f MB)", self.id, self.limit.limit / MB,
                     self.limit.base / MB, budget / MB, idle_footprint() / MB)
        elif budget != self.budget:
            self._limit_to(self.limit.base, budget)
            log.info("device %d: kernel memory limit now %.1f MB (budget %.1f MB)", self.id, self.limit.limit / MB,
                     budget / MB)

    def _rebase(self, holding: int) -> None:
        """At a round's start: the idle footprint is what the cgroup is charged now, less the ``holding`` bytes of
        the round's incoming weights (the budget pays for those). What the process took since it was ready (its
        data, the transport's buffers, the runtime's caches) is charged too, so a budget that drops later limits
        training, not the process's own keep."""
        usage = self.limit.usage()
        if usage is not None and usage - holding != self.limit.base:
            self._limit_to(max(usage - holding, 0), self.budget)

    def _limit_to(self, base: int, budget: int) -> None:
        self.limit = self.limit.resize(base + budget, base=base)  # in place: never a cgroup nested in the last
        self.budget = budget

    def close(self) -> None:
        if self.limit is not None:
            self.limit.leave()

    def _real_peak(self, plan) -> int:
        """What this process took for the round at the step's peak: by the heap counter (above the heap when the
        round began), or by the kernel (the cgroup's peak charge above the idle footprint: every page, the
        transport's buffers included)."""
        if self.counter is not None:
            return max(self.counter.heap.peak() - self.counter.baseline, 0)
        return max((self.limit.peak() or 0) - self.limit.base, 0)

    _ARGS = {"start_round": {"instructions", "observe"}, "plan_step": {"clock"}, "budget_returns_at": {"clock"},
             "paused": set(), "dropped_out": set(), "begin_step": {"step"}, "forward": {"micro_batch"},
             "backward": {"gradient"}, "end_step": set(), "take_back": {"handoff"}, "finish_round": {"times"}}

    def call(self, method: str, args: dict) -> Any:
        """Run the edge's call on the device role, once it is checked against the round under way (``checks``):
        a call that is not in good form raises ``Malformed`` before the role sees any of it."""
        if self.role is None:
            raise Malformed(f"a {method[:40]!r} call before the welcome")
        if method not in self._ARGS or not isinstance(args, dict) or set(args) != self._ARGS[method]:
            raise Malformed(f"an unknown call {method[:40]!r}, or its arguments are not {sorted(self._ARGS.get(method, ()))}")
        self._check(method, args)
        role = self.role
        if method == "start_round":
            if self.counter is not None:
                self.counter.baseline = self.counter.heap.live()
            observer = self.observer() if args["observe"] else None
            self.pending, self.assigned_cut = None, args["instructions"].cut
            if self.limit is not None:
                self._rebase(sum(t.numel() * t.element_size() for state in args["instructions"].weights.values()
                                 for t in state.values()))
                self.limit.reset_peak()
            sizes = role.start_round(args["instructions"], observer)
            self.step_count = len(sizes)
            return sizes
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
            self.micro_batches = role.begin_step(args["step"])
            return self.micro_batches
        if method == "forward":
            try:
                activation = role.forward(args["micro_batch"])
            except DeviceOutOfMemory:
                return {"activation": None, "oom": True}
            self.pending = activation
            return {"activation": activation, "oom": False}
        simple = {"budget_returns_at": lambda: role.budget_returns_at(args["clock"]), "paused": role.paused,
                  "dropped_out": role.dropped_out, "backward": lambda: role.backward(args["gradient"]),
                  "end_step": lambda: plain(role.end_step()), "take_back": lambda: role.take_back(args["handoff"]),
                  "finish_round": lambda: role.finish_round(typed(SimulatedTimes, args["times"], "finish_round's times"))}
        return simple[method]()

    def _check(self, method: str, args: dict) -> None:
        shapes, role = self.shapes, self.role
        if method == "start_round":
            i = args["instructions"]
            if not isinstance(i, RoundInstructions) or not isinstance(args["observe"], bool):
                raise Malformed("start_round without RoundInstructions")
            check_sender(i.device_id, self.id, "the round's instructions")
            check_int(i.cut, "the round's cut", 1, shapes.num_units)
            shapes.check_units(i.weights, range(1, i.cut + 1), "the round's weights")
        elif method in ("plan_step", "budget_returns_at"):
            check_number(args["clock"], "the clock", low=0.0)
        elif method == "begin_step":
            check_int(args["step"], "the step", 0, self.step_count - 1)
        elif method == "forward":
            check_int(args["micro_batch"], "the micro-batch", 0, self.micro_batches - 1)
        elif method == "backward":
            pending = self.pending
            if pending is None:
                raise Malformed("a gradient for no activation")
            shapes.check_gradient(args["gradient"], device_id=self.id, step=pending.step,
                                  micro_batch=pending.micro_batch, like=pending.tensor)
            self.pending = None
        elif method == "take_back":
            handed = range(role.cut + 1, self.assigned_cut + 1)
            shapes.check_handoff(args["handoff"], self.id, handed, "the units handed back")


def _own_examples(info: dict) -> Dataset:
    """The device's examples, as its edge sent them: images N x C x H x W, finite, with a label each."""
    x, y, classes = info.get("x"), info.get("y"), info.get("num_classes")
    check_int(classes, "the number of classes", 2, 1 << 20)
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == 4 and x.dtype == torch.float32
            and y.shape == (len(x),) and y.dtype == torch.int64 and len(y) > 0):
        raise Malformed("the welcome's examples are not float32 images with an int64 label each")
    if not bool(torch.isfinite(x).all()) or int(y.min()) < 0 or int(y.max()) >= classes:
        raise Malformed("the welcome's examples hold non-finite values or labels outside the classes")
    return Dataset("own examples", x, y, classes)


def _budget(spec: str, trace):
    if spec == "trace":
        return trace
    if spec == "available":
        return AvailableMemoryTrace()
    try:
        return FixedBudget(int(float(spec)))
    except ValueError:
        raise SmartSplitError(f"--budget {spec!r}: give 'trace', 'available' or a number of bytes") from None


def one_malloc_arena() -> bool:
    """Ask glibc for one malloc arena for every thread (``mallopt(M_ARENA_MAX, 1)``): the calls reach the device on
    the transport's threads, and each thread's own arena would take fresh pages for memory an earlier thread
    freed, charging a memory limit for what the process already holds. False where it is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-8, 1))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def run_device(edge: str, device_id: int, certs: Path | None, options: DeviceOptions = DeviceOptions()) -> None:
    """Serve as device ``device_id`` through the edge at ``edge`` until the run ends. Reconnects when the link
    drops (an edge restarting); gives up after ``options.retry_s`` without reaching it."""
    if options.enforce_budget:
        one_malloc_arena()
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
            hint = ("" if code != grpc.StatusCode.UNAVAILABLE else
                    "; is it listening there, and do both ends agree on TLS (both --certs, or both --insecure)?")
            if time.monotonic() - last_contact > options.retry_s:
                raise SmartSplitError(f"{name}: cannot reach the edge at {edge} ({code.name}: {exc.details()}); "
                                      f"gave up after {options.retry_s:.0f} s{hint}") from None
            log.info("%s: edge at %s unreachable (%s)%s; retrying", name, edge, code.name, hint)
            time.sleep(1.0)


def _session(edge: str, certs: Path | None, name: str, me: _Device) -> bool:
    """One stream to the edge; True when the edge said the run is over. A message from the edge that cannot be
    read ends the stream (logged; the device connects again); a call not in good form is refused (the edge
    drops the device for the round) and nothing of it is applied."""
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
        assembly = Reassembly(me.message_limit)
        try:
            for frame in stub.Session(requests(), metadata=claimed(name), wait_for_ready=False):
                payload = assembly.add(frame)
                if payload is None:
                    continue
                kind, body = decode(payload)
                if kind == "welcome":
                    me.welcome(body)
                    assembly.limit = me.message_limit
                    outgoing.put(encode("ready"))
                elif kind == "call" and isinstance(body, dict):
                    outgoing.put(_answer(me, name, body.get("method"), body.get("args")))
                elif kind == "bye":
                    log.info("%s: the run is over", name)
                    return True
                else:
                    raise WireError(f"a {kind[:40]!r} message, which no edge sends")
        except WireError as exc:
            log.error("%s: the edge at %s sent a message this device will not read (%s); the stream is closed and "
                      "nothing of it applied", name, edge, exc)
        finally:
            outgoing.put(None)
    return False


def _answer(me: _Device, name: str, method, args):
    """The reply to one call: its result, or an error the edge drops the device for (and logs)."""
    try:
        return encode("reply", me.call(str(method), args))
    except Malformed as exc:
        log.error("%s: refused the edge's %s call, which is not in good form: %s", name, str(method)[:40], exc)
        return encode("error", f"refused a malformed {str(method)[:40]} call")
    except Exception as exc:  # the edge drops this device for the round and logs why
        log.exception("%s: %s failed", name, str(method)[:40])
        return encode("error", f"{type(exc).__name__}: {str(exc)[:200]}")
