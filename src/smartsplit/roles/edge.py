"""The edge role: the server-side units its devices train through, one micro-batch at a time.

Each round the edge loads the global weights (``EdgeInstructions``) into one server-side copy shared by all its
devices, or one copy per device. For each device's ``Activation`` it runs the units past the device's cut
(and any units the device handed over when squeezed), the loss, and backward, and answers with the
``Gradient``; after a step's last micro-batch it steps its optimizers and lets the strategy's step observer
see the units it holds. At the round's end it returns handed-over units and gives its copies as ``Update``s.
Which device it serves next is not its business: the engine's clock (or, deployed, arrival order) decides.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from smartsplit.kernels.aggregate import unit_state, unit_states
from smartsplit.kernels.step import edge_backward, make_optimizer
from smartsplit.roles.device import EdgeCopy, OptimizerSpec
from smartsplit.messages import Activation, EdgeInstructions, Gradient, Observation, UnitHandoff, Update
from smartsplit.strategies.base import StepObserver


@dataclass
class _Session:
    cut: int  # the device's assigned cut: the edge trains units cut+1..L for it
    units: nn.Sequential  # the server-side copy it trains through (shared or its own)
    optimizer: torch.optim.Optimizer | None
    samples: dict[int, int]  # samples that trained each unit of that copy
    handed: dict[int, nn.Module] = field(default_factory=dict)  # units the device gave up, by index
    handed_optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    chain: nn.Sequential | None = None  # what it trains for the device: handed units, then units past its cut
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)

    def rebuild(self) -> None:
        """After the session opens or units are handed over (not per micro-batch: serving is the hot path)."""
        self.chain = nn.Sequential(*(self.handed[i] for i in sorted(self.handed)), *self.units[self.cut :])
        self.optimizers = [o for o in (self.optimizer, *self.handed_optimizers) if o is not None]


class EdgeRole:
    """One edge server. ``architecture`` is the model's structure (its weights come with each round)."""

    def __init__(self, index: int, architecture: nn.Sequential, optimizer: OptimizerSpec) -> None:
        self.index = index
        self.architecture = architecture
        self.optimizer = optimizer
        self._shared: _Session | None = None
        self._global: nn.Sequential | None = None
        self._sessions: dict[int, _Session] = {}
        self._cuts: dict[int, int] = {}
        self._observer: StepObserver | None = None

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        return make_optimizer(params, self.optimizer.name, self.optimizer.lr, self.optimizer.momentum)

    def start_round(self, instructions: EdgeInstructions, observer: StepObserver | None = None) -> None:
        model = copy.deepcopy(self.architecture)
        for index, state in instructions.weights.items():
            model[index - 1].load_state_dict(state)
        self._cuts, self._observer, self._sessions = dict(instructions.cuts), observer, {}
        self._shared = self._global = None
        if instructions.copies == "shared":
            self._shared = _Session(0, model, self._optimizer(list(model.parameters())), {i: 0 for i in range(1, len(model) + 1)})
        else:
            self._global = model

    def open_session(self, device_id: int) -> None:
        """A device starts its round through this edge."""
        cut = self._cuts[device_id]
        if self._shared is not None:
            shared = self._shared
            session = _Session(cut, shared.units, shared.optimizer, shared.samples)
        else:  # the device's own server-side copy
            units = copy.deepcopy(self._global)
            session = _Session(cut, units, self._optimizer(list(units[cut:].parameters())),
                               {i: 0 for i in range(1, len(units) + 1)})
        session.rebuild()
        self._sessions[device_id] = session

    def own_copy(self, device_id: int) -> EdgeCopy:
        """The device's own server-side copy (per-device copies only), for a device whose steps wait to run
        grouped: they train it as serving its steps would have."""
        session = self._sessions[device_id]
        if self._shared is not None or session.handed:
            raise RuntimeError(f"device {device_id}: only a per-device copy with no handed-over units can train apart")
        return EdgeCopy(session.units[session.cut :], session.optimizer, session.samples, session.cut + 1)

    def receive(self, handoff: UnitHandoff) -> None:
        """Units a squeezed device gives up mid-round: the edge trains them, as that device's copy, from now on."""
        session = self._sessions[handoff.device_id]
        modules = []
        for index, state in sorted(handoff.weights.items()):
            unit = copy.deepcopy(self.architecture[index - 1])
            unit.load_state_dict(state)
            session.handed[index] = unit
            modules.append((index, unit))
        params = [p for _, unit in modules for p in unit.parameters()]
        optimizer = self._optimizer(params)
        if optimizer is not None:
            for index, unit in modules:
                for name, p in unit.named_parameters():
                    saved = handoff.optimizer_state.get(index, {}).get(name)
                    if saved:
                        optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}
            session.handed_optimizers.append(optimizer)
        session.rebuild()

    def serve(self, activation: Activation) -> Gradient:
        """Forward from the cut activation through the units past the device's cut, loss, backward."""
        session = self._sessions[activation.device_id]
        first = min(session.handed, default=session.cut + 1)
        units, optimizers = session.chain, session.optimizers
        if activation.micro_batch == 0:
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        loss, grad = edge_backward(units, activation.tensor, activation.labels, activation.batch_size)
        if activation.last:
            for optimizer in optimizers:
                optimizer.step()
            for index in range(session.cut + 1, len(session.units) + 1):
                session.samples[index] += activation.batch_size
            if self._observer is not None:
                for index, unit in enumerate(units, start=first):
                    session.observations.append((activation.step, index, self._observer.observe(index, unit)))
        return Gradient(activation.device_id, activation.step, activation.micro_batch, grad, loss)

    def abort(self, device_id: int) -> None:
        """The device's step stopped part-way (out of memory on the device): drop what it accumulated."""
        for optimizer in self._sessions[device_id].optimizers:
            optimizer.zero_grad(set_to_none=True)

    def close_session(self, device_id: int) -> tuple[UnitHandoff | None, Update | None, list[Observation]]:
        """The device's round is over: the units it handed over (to take back), its own server-side copy's update
        (per-device copies only) and what the step observer saw of the edge's units for it."""
        session = self._sessions.pop(device_id)
        back = None
        if session.handed:
            back = UnitHandoff(device_id, {i: unit_state(unit) for i, unit in session.handed.items()})
        own = _update(session.units, session.samples) if self._shared is None and session.cut < len(session.units) else None
        return back, own, session.observations

    def finish_round(self) -> Update | None:
        """The shared copy's update (None with per-device copies or when no device trained through it)."""
        shared, self._shared, self._global = self._shared, None, None
        return _update(shared.units, shared.samples) if shared is not None else None


def _update(units: nn.Sequential, samples: dict[int, int]) -> Update | None:
    trained = {i: n for i, n in samples.items() if n > 0}
    if not trained:
        return None
    return Update(units=unit_states(units, min(trained), len(units)), samples=trained)
