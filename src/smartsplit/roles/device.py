"""The device role: its data, its memory budget, the on-device manager and, for a round, its units.

Each round the device loads the units up to its cut from ``RoundInstructions``, and before every local step
reads its budget and plans (``plan_step``): the fastest plan that fits, re-planned when the budget changes if
the rules allow; squeezed below anything at its cut, it hands its deepest units to the edge (``UnitHandoff``)
or pauses. A step runs micro-batch by micro-batch: ``forward`` gives the ``Activation`` to send, ``backward``
takes the edge's ``Gradient``; the memory guard stops a forward that saves more than the plan allows
(``DeviceOutOfMemory``), and the memory meter (``measure``) gives the real peak of the plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from smartsplit.data import Dataset
from smartsplit.kernels.aggregate import unit_state, unit_states
from smartsplit.kernels.grouped import Client
from smartsplit.kernels.structure import materialise, structure_of
from smartsplit.kernels.step import backward_into, device_forward, make_optimizer, own_loss_backward, reference_step
from smartsplit.fleet import BudgetTrace, Device
from smartsplit.memory.ondevice import DevicePlan, OnDeviceManager
from smartsplit.meter.held import held_bytes
from smartsplit.kernels.saved import DeviceOutOfMemory, count_saved_bytes
from smartsplit.records import MB, DeviceReport
from smartsplit.messages import (
    Activation, DeviceResult, Gradient, Observation, RoundInstructions, UnitHandoff, Update,
)
from smartsplit.strategies.base import StepObserver

UNLIMITED = 2**62  # a budget no plan exceeds: the plain plan, whatever memory says


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    momentum: float
    slots: int  # optimizer state tensors per parameter


@dataclass(frozen=True)
class StepDone:
    """A finished local step, as the device saw it."""

    loss: float  # mean over the step's examples
    samples: int
    cut_bytes: int  # bytes of activations sent to the edge, all micro-batches together


@dataclass
class SimulatedTimes:
    """The engine's clock figures for a device's round (seconds, and bytes on the simulated links)."""

    compute_s: float = 0.0
    recompute_s: float = 0.0
    comm_s: float = 0.0
    wait_s: float = 0.0
    paused_s: float = 0.0
    finish_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(kw_only=True)
class RoundTally:
    """What a device's round counted, from which its report is written: by the device itself, or by its edge
    from what crossed the stream when the device is lost mid-round."""

    assigned_cut: int  # the cut the central server assigned
    cut: int  # where the device cuts now (shallower than assigned after a hand-off)
    min_budget: int | None = None  # the lowest budget it planned at
    peak_predicted: int = 0
    peak_measured: int | None = None
    held: int | None = None  # the most the role held at a step's end (``meter.held``)
    micro_batches: set[int] = field(default_factory=set)
    oom_events: int = 0
    replans: int = 0
    cut_moves: int = 0
    pauses: int = 0
    dropped_out: bool = False
    steps: int = 0  # finished
    samples: int = 0
    losses: list[float] = field(default_factory=list)

    def report(self, device: Device, times: SimulatedTimes, unread_budget: int) -> DeviceReport:
        """The round's ``DeviceReport``; ``unread_budget`` stands for the budget when the device never planned."""
        budget = unread_budget if self.min_budget is None else self.min_budget
        losses = self.losses
        return DeviceReport(
            device=device.id,
            device_class=device.device_class,
            cut=self.assigned_cut,
            final_cut=self.cut,
            budget_mb=round(budget / MB, 3),
            peak_predicted_mb=round(self.peak_predicted / MB, 3),
            peak_measured_mb=round(self.peak_measured / MB, 3) if self.peak_measured is not None else None,
            held_mb=round(self.held / MB, 3) if self.held is not None else None,
            micro_batches=sorted(self.micro_batches),
            oom_events=self.oom_events,
            replans=self.replans,
            cut_moves=self.cut_moves,
            pauses=self.pauses,
            dropped_out=self.dropped_out,
            steps=self.steps,
            samples=self.samples,
            loss=float(np.mean(losses)) if losses else None,
            loss_rms=float(np.sqrt(np.mean(np.square(losses)))) if losses else None,
            **asdict(times),
        )


@dataclass(kw_only=True)
class _RoundState(RoundTally):
    instructions: RoundInstructions
    units: nn.Sequential
    optimizer: torch.optim.Optimizer | None
    batches: list[np.ndarray]
    observer: StepObserver | None
    plan: DevicePlan | None = None
    planned_for: int = -1  # the budget the plan was made for
    planned_at: int = 0  # the budget when the latest step was planned
    observations: list[Observation] = field(default_factory=list)
    # the step under way
    step: int = 0
    budget: int = 0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    loss_sum: float = 0.0
    crossed: int = 0
    pending: torch.Tensor | None = None  # the micro-batch's cut activation, waiting for its gradient
    deferred: int = 0  # the first steps, whose arithmetic waits to run grouped with other devices' (engine.grouping)


@dataclass
class EdgeCopy:
    """A device's own server-side copy at its edge (per-device copies): the units past its cut, their optimizer
    and the edge's count of the samples that trained each of them. A device whose steps wait to run grouped
    (``engine.grouping``) runs them through it: with its own copy, a split device's step is the whole model's
    step, its units held in two places."""

    units: nn.Sequential  # units first..L, named as in the whole model
    optimizer: torch.optim.Optimizer | None
    samples: dict[int, int]
    first: int

    def trained(self, samples: int) -> None:
        """A step of ``samples`` examples ran through these units."""
        for index in range(self.first, self.first + len(self.units)):
            self.samples[index] += samples


class DeviceSide(Protocol):
    """A device's part of a round, as the round engine (``engine.round``) drives it, phase by phase: the same
    calls whether the device is a role in this process (``DeviceRole``) or a process across a stream
    (``deploy.edge.RemoteDevice``).

    download: ``start_round``; plan: ``plan_step`` (with the units to hand the edge when the cut moves up),
    ``budget_returns_at`` and ``paused`` while nothing fits; step: ``begin_step``, then ``forward`` and
    ``backward`` per micro-batch, ``end_step``; hand-off back: ``take_back``; drop-out: ``dropped_out``;
    report: ``finish_round``.
    """

    id: int
    device: Device

    def start_round(self, instructions: RoundInstructions, observer: StepObserver | None = None) -> list[int]:
        """Load units 1..cut from the instructions; the number of examples of each local step this round."""

    def plan_step(self, clock_s: float) -> tuple[DevicePlan | None, UnitHandoff | None]: ...

    def budget_returns_at(self, clock_s: float) -> float | None: ...

    def paused(self) -> None: ...

    def begin_step(self, step: int) -> int:
        """Micro-batches of local step ``step``; 0 when it cannot start (out of memory)."""

    def forward(self, micro_batch: int) -> Activation | None: ...

    def backward(self, gradient: Gradient) -> None: ...

    def end_step(self) -> StepDone: ...

    def take_back(self, handoff: UnitHandoff) -> None: ...

    def dropped_out(self) -> None: ...

    def finish_round(self, times: SimulatedTimes) -> DeviceResult: ...


def local_step_count(samples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """How many local steps a device with ``samples`` examples takes a round (``local_batches``' length)."""
    return steps if steps is not None else max(1, math.ceil(epochs * samples / batch_size))


def local_batches(
    indices: np.ndarray, batch_size: int, steps: int | None, epochs: float | None, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Sample indices of each local step: reshuffled passes over the device's data (in order without ``rng``)."""
    total = local_step_count(len(indices), batch_size, steps, epochs)
    batches: list[np.ndarray] = []
    order = np.empty(0, dtype=np.int64)
    while len(batches) < total:
        if len(order) == 0:
            order = rng.permutation(indices) if rng is not None else np.asarray(indices)
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


class DeviceRole:
    """One device. ``architecture`` is the model's structure (kept on the meta device: the weights of the units it
    trains come in each round's instructions, and it never holds the others); ``data[shard]`` is the device's own data; ``measure(plan)`` is its memory meter (the
    peak of one step under ``plan``), or None where no meter runs."""

    def __init__(
        self, device: Device, data: Dataset, shard: np.ndarray, trace: BudgetTrace, manager: OnDeviceManager,
        architecture: nn.Sequential, optimizer: OptimizerSpec, batch_size: int, local_steps: int | None,
        local_epochs: float | None, measure: Callable[[DevicePlan], int] | None = None,
    ) -> None:
        self.device = device
        self.data = data
        self.shard = shard
        self.trace = trace
        self.manager = manager
        self.architecture = structure_of(architecture)  # shapes only: a device holds the weights it trains
        self.optimizer = optimizer
        self.batch_size, self.local_steps, self.local_epochs = batch_size, local_steps, local_epochs
        self.measure = measure
        self.deferring = False  # this round's steps may wait to run grouped (set by engine.grouping, each round)
        self._edge_copy: Callable[[], EdgeCopy] | None = None  # a split device's own server-side copy, while its steps wait
        self._waiting_cut_bytes = 0  # what each example of a waiting step would have sent to the edge
        self._round: _RoundState | None = None

    @property
    def id(self) -> int:
        return self.device.id

    # ---- a round

    def start_round(self, instructions: RoundInstructions, observer: StepObserver | None = None) -> list[int]:
        """Load units 1..cut from the instructions; the number of examples of each local step this round."""
        units = materialise(self.architecture[: instructions.cut], instructions.weights)  # the message's tensors
        batches = self.local_batches(instructions)
        opt = make_optimizer(list(units.parameters()), self.optimizer.name, self.optimizer.lr, self.optimizer.momentum)
        self.manager.checkpointing = instructions.checkpointing
        self._round = _RoundState(instructions=dataclasses.replace(instructions, weights={}),  # loaded: let go
                                  units=units, optimizer=opt, batches=batches, observer=observer,
                                  assigned_cut=instructions.cut, cut=instructions.cut)
        return [len(b) for b in batches]

    def local_batches(self, instructions: RoundInstructions) -> list[np.ndarray]:
        """The sample indices of each local step this round: seeded passes over the device's shard."""
        return local_batches(self.shard, self.batch_size, self.local_steps, self.local_epochs,
                             np.random.default_rng(list(instructions.batch_seed)))

    def wait(self, edge_copy: Callable[[], EdgeCopy] | None = None, cut_bytes_per_example: int = 0) -> None:
        """The next round's steps may wait to run grouped (``engine.grouping``). A split device's own server-side
        copy (``edge_copy()``, from when the round has started at the edge) trains with them, and each waiting
        step counts what its activations would have sent to the edge."""
        self.deferring, self._edge_copy, self._waiting_cut_bytes = True, edge_copy, cut_bytes_per_example

    @property
    def cut(self) -> int:
        """Where the device cuts now."""
        return self._state.cut

    def budget_returns_at(self, clock_s: float) -> float | None:
        """When the budget next changes after ``clock_s`` (None: never)."""
        return self.trace.next_change(clock_s)

    def plan_step(self, clock_s: float) -> tuple[DevicePlan | None, UnitHandoff | None]:
        """The plan for the next step at the budget of ``clock_s`` (None: nothing fits, not even cut 1), and the
        units to hand the edge if the plan cuts shallower than the device does now."""
        r, rules = self._state, self._state.instructions
        budget = self.trace.at(clock_s)
        r.min_budget = budget if r.min_budget is None else min(r.min_budget, budget)
        r.planned_at = budget
        handoff = None
        if r.plan is None or (rules.replan and budget != r.planned_for):
            new = self.manager.deepest_fitting_cut(r.cut, budget) if rules.move_cut else self.manager.plan(r.cut, budget)
            if new is None and not rules.replan:
                new = self.manager.plan(r.cut, UNLIMITED)  # a baseline runs its plain plan whatever the budget says
            if new is None:
                return None, None
            if r.plan is not None and new != r.plan:
                r.replans += 1
            if new.cut < r.cut:
                r.cut_moves += 1
                handoff = self._hand_off(new.cut + 1, r.cut)
            r.plan, r.planned_for, r.cut = new, budget, new.cut
        r.micro_batches.add(r.plan.micro_batch)
        r.peak_predicted = max(r.peak_predicted, r.plan.peak_bytes)
        return r.plan, handoff

    def paused(self) -> None:
        self._state.pauses += 1

    def dropped_out(self) -> None:
        self._state.dropped_out = True

    # ---- a step: begin_step, then forward (and backward with the edge's gradient) per micro-batch, then end_step

    def begin_step(self, step: int) -> int:
        """Start local step ``step`` under the plan ``plan_step`` made: its number of micro-batches, or 0 when even
        with nothing saved the plan does not fit the budget it was made at (an out-of-memory event: the step
        cannot start)."""
        r = self._state
        budget, plan = r.planned_at, r.plan
        memory = plan.memory
        if memory.total - memory.activations > budget:
            r.oom_events += 1
            return 0
        if r.optimizer is not None:
            r.optimizer.zero_grad(set_to_none=True)
        indices = r.batches[step]
        r.x, r.y = self.data.x[indices], self.data.y[indices]
        r.loss_sum, r.crossed, r.budget, r.step = 0.0, 0, budget, step
        return -(-len(r.y) // plan.micro_batch)

    def forward(self, micro_batch: int) -> Activation | None:
        """Run micro-batch ``micro_batch`` to the cut: the ``Activation`` for the edge, or None when the device
        holds every unit (it then computes the loss and runs backward itself). Raises ``DeviceOutOfMemory``
        (and records the event) when the forward saves more than the plan and the budget allow."""
        r, plan = self._state, self._state.plan
        unguarded = self._guard_cannot_trip()
        if self.deferring:
            if r.deferred == r.step and unguarded:
                r.deferred += 1  # run it later, with others (the guard it skips could not have tripped)
                r.crossed = len(r.y) * self._waiting_cut_bytes
                return None
            self.catch_up()  # its plan or budget no longer allows waiting: on alone from here
        n, size = len(r.y), plan.micro_batch
        start = micro_batch * size
        xb, yb = r.x[start : start + size], r.y[start : start + size]
        if unguarded:
            activation = device_forward(r.units[: r.cut], xb, plan.segments)
        else:
            activation = self._guarded_forward(xb)
        if r.cut == len(self.architecture):
            r.loss_sum += own_loss_backward(activation, yb, n)
            return None
        r.pending = activation
        r.crossed += activation.numel() * activation.element_size()
        return Activation(self.id, r.step, micro_batch, start + size >= n, activation.detach(), yb, n)

    def _guard_cannot_trip(self) -> bool:
        """The step runs its plain plan (nothing recomputed, one micro-batch) at a budget that holds the plan's
        peak: its forward saves what the plan's profile says, which the guard's limit covers."""
        r, plan = self._state, self._state.plan
        return not plan.segments and plan.micro_batch >= len(r.y) and r.budget >= plan.peak_bytes

    def _guarded_forward(self, xb: torch.Tensor) -> torch.Tensor:
        """The forward to the cut, counting what it saves for backward: the count that crosses the guard's limit
        raises ``DeviceOutOfMemory`` (and records the event). The limit: what the plan predicts the forward holds,
        plus the room the budget leaves above its peak, plus the cut activation (which the last unit may save;
        it is counted apart)."""
        r, plan = self._state, self._state.plan
        limit = max(plan.held_bytes + r.budget - plan.peak_bytes, 0) + plan.memory.cut_io // 2
        try:
            with count_saved_bytes(exclude=[*r.units[: r.cut].parameters(), xb], limit=limit) as saved:
                activation = device_forward(r.units[: r.cut], xb, plan.segments, saved)
        except DeviceOutOfMemory:
            r.oom_events += 1
            raise
        saved.discount(activation)
        return activation

    def backward(self, gradient: Gradient) -> None:
        r = self._state
        backward_into(r.pending, gradient.tensor)
        r.pending = None
        r.loss_sum += gradient.loss

    def end_step(self) -> StepDone:
        """Step the optimizer; measure the plan's real peak; let the strategy's observer see the units."""
        r = self._state
        waiting = r.step < r.deferred  # its arithmetic runs later (catch_up, step_deferred_together)
        if r.optimizer is not None and not waiting:
            r.optimizer.step()
        for index, unit in enumerate(r.units[: r.cut], start=1):
            if r.observer is not None:
                r.observations.append((r.step, index, r.observer.observe(index, unit)))
        if not waiting:
            self._note_held()
        if self.measure is not None:
            measured = self.measure(r.plan)
            r.peak_measured = max(r.peak_measured or 0, measured)
            if measured > r.budget:
                r.oom_events += 1
        done = StepDone(loss=math.nan if waiting else r.loss_sum, samples=len(r.y), cut_bytes=r.crossed)
        r.steps += 1
        r.samples += done.samples
        r.losses.append(done.loss)
        r.x = r.y = None
        return done

    def _note_held(self) -> None:
        r = self._state
        held = held_bytes([r.units], [t for state in r.instructions.weights.values() for t in state.values()],
                          r.optimizer)
        r.held = max(r.held or 0, held)

    # ---- steps whose arithmetic waited (engine.grouping)

    @property
    def waiting(self) -> bool:
        """Finished steps whose arithmetic has not run yet."""
        return self._round is not None and self._round.deferred > 0

    @property
    def deferred_steps(self) -> int:
        return self._state.deferred

    def deferred_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples of waiting step ``step``."""
        indices = self._state.batches[step]
        return self.data.x[indices], self.data.y[indices]

    def deferred_client(self) -> Client:
        """The units whose waiting steps are to run (``kernels.grouped.Stacked``): the device's, then its own
        server-side copy's when it is split, with their momentum, named as in the whole model."""
        r, edge = self._state, self._own_copy()
        if edge is None:
            return Client(r.units, _momentum(r.units, r.optimizer))
        mine, theirs = _momentum(r.units, r.optimizer), _momentum(edge.units, edge.optimizer)
        whole = nn.Sequential(OrderedDict([*r.units.named_children(), *edge.units.named_children()]))
        return Client(whole, None if mine is None or theirs is None else {**mine, **theirs})

    def finish_deferred(self, client: Client, losses: list[float]) -> None:
        """The waiting steps have run on ``client`` (this device's own units, and its server-side copy's), with
        these losses: keep the momentum as the optimizers' state, count the edge copy's samples, note what the
        device holds, stop waiting."""
        r, edge = self._state, self._own_copy()
        r.losses[: len(losses)] = losses
        if client.momentum is not None:
            _keep_momentum(r.units, r.optimizer, client.momentum)
            if edge is not None:
                _keep_momentum(edge.units, edge.optimizer, client.momentum)
        self._stop_waiting()

    def catch_up(self) -> None:
        """Run the steps that waited, one at a time (each the plain step it was planned as), and stop waiting."""
        r, edge = self._state, self._own_copy()
        for j in range(r.deferred):
            x, y = self.deferred_batch(j)
            r.losses[j] = reference_step(r.units[: r.cut], edge.units if edge is not None else nn.Sequential(), x, y,
                                         r.optimizer, edge.optimizer if edge is not None else None).loss
            self._note_held()
        if r.optimizer is not None:
            r.optimizer.zero_grad(set_to_none=True)  # the step under way starts from no gradient
        self._stop_waiting()

    def _own_copy(self) -> EdgeCopy | None:
        return self._edge_copy() if self._edge_copy is not None else None

    def _stop_waiting(self) -> None:
        r, edge = self._state, self._own_copy()
        if edge is not None:
            for j in range(r.deferred):
                edge.trained(len(r.batches[j]))
        self._note_held()
        r.deferred = 0
        self._forget_waiting()

    def _forget_waiting(self) -> None:
        self.deferring, self._edge_copy, self._waiting_cut_bytes = False, None, 0

    # ---- units moving to and from the edge

    def _hand_off(self, first: int, last: int) -> UnitHandoff:
        """Units ``first..last`` with their optimizer state, for the edge; the device lets go of them (weights,
        gradients, optimizer state) and holds only what it still trains."""
        r = self._state
        weights, state = {}, {}
        for index in range(first, last + 1):
            unit = r.units[index - 1]
            weights[index] = unit_state(unit)
            if r.optimizer is not None:
                state[index] = {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in r.optimizer.state[p].items()}
                                for name, p in unit.named_parameters() if p in r.optimizer.state}
        self._release(first, last)
        return UnitHandoff(self.id, weights, state)

    def _release(self, first: int, last: int) -> None:
        r = self._state
        for index in range(first, last + 1):
            r.units[index - 1] = nn.Identity()  # a place holder: the edge trains the unit until the round's end
        if r.optimizer is not None:
            kept = list(r.units.parameters())
            optimizer = make_optimizer(kept, self.optimizer.name, self.optimizer.lr, self.optimizer.momentum)
            if optimizer is not None:
                for p in kept:
                    if p in r.optimizer.state:
                        optimizer.state[p] = r.optimizer.state[p]
            r.optimizer = optimizer

    def take_back(self, handoff: UnitHandoff) -> None:
        """Units the edge trained for this device since it handed them over, rebuilt from what it returns."""
        for index, state in handoff.weights.items():
            self._state.units[index - 1] = materialise(self.architecture[index - 1 : index], {1: state})[0]

    # ---- the round's end

    def finish_round(self, times: SimulatedTimes) -> DeviceResult:
        r = self._state
        update = None
        if r.steps:
            update = Update(units=unit_states(r.units, 1, r.assigned_cut),
                            samples={i: r.samples for i in range(1, r.assigned_cut + 1)})
        report = r.report(self.device, times, unread_budget=self.trace.at(0.0))
        observations = r.observations if r.steps else []
        self._round = None
        self._forget_waiting()
        return DeviceResult(update, report, observations)

    @property
    def _state(self) -> _RoundState:
        if self._round is None:
            raise RuntimeError(f"device {self.id}: no round under way (start_round first)")
        return self._round


def _momentum(units: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor] | None:
    """The SGD momentum buffers of ``units`` in ``optimizer``, by parameter name (None before the first step)."""
    if optimizer is None:
        return None
    buffers = {name: optimizer.state.get(p, {}).get("momentum_buffer") for name, p in units.named_parameters()}
    return None if any(b is None for b in buffers.values()) else buffers


def _keep_momentum(units: nn.Module, optimizer: torch.optim.Optimizer | None, momentum: dict[str, torch.Tensor]) -> None:
    """Make ``momentum`` (by parameter name) the SGD momentum buffers of ``units`` in ``optimizer``."""
    if optimizer is not None:
        for name, p in units.named_parameters():
            optimizer.state[p]["momentum_buffer"] = momentum[name]
