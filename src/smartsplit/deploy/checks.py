"""What a well-formed message looks like, from the plan: every tensor a peer sends is checked against the model's
units (state names, shapes, dtypes), the cut, the step and the micro-batch before anything uses it.

The wire (``wire``) already guarantees a message is data of the declared types with tensors whose bytes match
their declared shapes. These checks add what only the receiver knows: which units, which shapes, which device
(the identity its certificate proved), which step. A message that fails them is ``Malformed``, and costs its
sender only: an edge drops that device from the round; a device refuses the call and applies nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.kernels.structure import one_at_a_time
from smartsplit.messages import Activation, Gradient, UnitHandoff, Update

StateShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]
OBSERVATION_NUMBERS = 1 << 14  # the most numbers one step observation may hold (MEC's sketches hold 1,024)


class Malformed(SmartSplitError):
    """A peer's message that is not what the plan expects at this point of the round."""


class Impersonation(Malformed):
    """A peer's message that names another device than the one its certificate proved."""


@dataclass(frozen=True)
class ModelShapes:
    """The shapes of everything a round of this model sends: each unit's state, each unit's output per example."""

    states: tuple[StateShapes, ...]  # unit i (1-based) is states[i - 1]
    outputs: tuple[tuple[int, ...], ...]  # the output of unit i, per example
    output_dtypes: tuple[torch.dtype, ...]
    num_classes: int
    batch_size: int
    param_bytes: int  # of the whole model

    @classmethod
    def of(cls, architecture: nn.Sequential, input_shape: tuple[int, ...], num_classes: int,
           batch_size: int) -> ModelShapes:
        states = tuple({k: (tuple(v.shape), v.dtype) for k, v in unit.state_dict().items()} for unit in architecture)
        outputs, dtypes, h = [], [], torch.zeros((1, *input_shape))
        with torch.no_grad():
            for unit in one_at_a_time(architecture):  # a device's structure: never all units at once
                h = unit(h)
                outputs.append(tuple(h.shape[1:]))
                dtypes.append(h.dtype)
        param_bytes = sum(p.numel() * p.element_size() for p in architecture.parameters())
        return cls(states, tuple(outputs), tuple(dtypes), num_classes, batch_size, param_bytes)

    @property
    def num_units(self) -> int:
        return len(self.states)

    def message_limit(self, optimizer_slots: int) -> int:
        """The most bytes one message of a round may take: a device's units with their optimizer state (a
        hand-off), or its update, or a step's activation and labels, with room for the framing."""
        weights = (2 + optimizer_slots) * self.param_bytes
        activation = self.batch_size * 4 * max(math.prod(o) for o in self.outputs) + self.batch_size * 8
        return max(weights, activation) + (1 << 20)

    def check_units(self, weights: dict, units: range, what: str) -> None:
        """``weights`` holds exactly ``units``, each with the unit's state names, shapes and dtypes, all finite."""
        if not isinstance(weights, dict) or set(weights) != set(units):
            got = sorted(weights)[:8] if isinstance(weights, dict) else type(weights).__name__
            raise Malformed(f"{what}: units {got}, expected {list(units)[:8]}")
        for index in units:
            self.check_state(weights[index], self.states[index - 1], f"{what} unit {index}")

    @staticmethod
    def check_state(state: dict, expected: StateShapes, what: str) -> None:
        if not isinstance(state, dict) or set(state) != set(expected):
            raise Malformed(f"{what}: tensors named {sorted(state)[:6] if isinstance(state, dict) else state!r}, "
                            f"expected {sorted(expected)[:6]}")
        for name, (shape, dtype) in expected.items():
            check_tensor(state[name], shape, dtype, f"{what} {name}")

    def check_handoff(self, handoff: UnitHandoff, device_id: int, units: range, what: str) -> None:
        if not isinstance(handoff, UnitHandoff):
            raise Malformed(f"{what}: a {type(handoff).__name__}, not a UnitHandoff")
        check_sender(handoff.device_id, device_id, what)
        self.check_units(handoff.weights, units, what)
        if not set(handoff.optimizer_state) <= set(units):
            raise Malformed(f"{what}: optimizer state for units {sorted(handoff.optimizer_state)[:8]}")
        for index, params in handoff.optimizer_state.items():
            for name, state in params.items():
                if name not in self.states[index - 1]:
                    raise Malformed(f"{what}: optimizer state for {name!r}, not a parameter of unit {index}")
                shape, dtype = self.states[index - 1][name]
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        check_tensor(value, shape, dtype, f"{what} unit {index} {name} {key}")

    def check_update(self, update: Update, units: range, samples: int, what: str) -> None:
        """A device's update of ``units``, each trained on ``samples`` examples (what the edge counted)."""
        if not isinstance(update, Update):
            raise Malformed(f"{what}: a {type(update).__name__}, not an Update")
        self.check_units(update.units, units, what)
        if update.samples != {i: samples for i in units}:
            raise Malformed(f"{what}: claims {sorted(update.samples.items())[:4]} samples; the edge counted {samples}")

    def check_activation(self, activation, *, device_id: int, step: int, micro_batch: int, examples: int,
                         cut: int, batch: int, last: bool) -> None:
        """One micro-batch's activation, as the step and the plan say it must be."""
        what = f"device {device_id}'s activation (step {step}, micro-batch {micro_batch})"
        if not isinstance(activation, Activation):
            raise Malformed(f"{what}: a {type(activation).__name__}, not an Activation")
        check_sender(activation.device_id, device_id, what)
        if (activation.step, activation.micro_batch, activation.last, activation.batch_size) != (
                step, micro_batch, last, batch):
            raise Malformed(f"{what}: says step {activation.step}, micro-batch {activation.micro_batch}, last "
                            f"{activation.last}, batch {activation.batch_size}; expected {step}, {micro_batch}, "
                            f"{last}, {batch}")
        check_tensor(activation.tensor, (examples, *self.outputs[cut - 1]), self.output_dtypes[cut - 1], what)
        check_tensor(activation.labels, (examples,), torch.int64, f"{what} labels")
        if examples and not (0 <= int(activation.labels.min()) and int(activation.labels.max()) < self.num_classes):
            raise Malformed(f"{what}: labels outside 0..{self.num_classes - 1}")

    @staticmethod
    def check_gradient(gradient, *, device_id: int, step: int, micro_batch: int, like: torch.Tensor) -> None:
        """The edge's answer to one activation: same device, step and micro-batch, the activation's shape."""
        what = f"the gradient for step {step}, micro-batch {micro_batch}"
        if not isinstance(gradient, Gradient):
            raise Malformed(f"{what}: a {type(gradient).__name__}, not a Gradient")
        check_sender(gradient.device_id, device_id, what)
        if (gradient.step, gradient.micro_batch) != (step, micro_batch):
            raise Malformed(f"{what}: it answers step {gradient.step}, micro-batch {gradient.micro_batch}")
        check_tensor(gradient.tensor, tuple(like.shape), like.dtype, what)
        check_number(gradient.loss, what + " loss")


def check_observations(observations: object, steps: int, units: range, what: str) -> None:
    """At most one observation per step and unit, each ``(step, unit, finite vector)`` of those steps and units."""
    if not isinstance(observations, list) or len(observations) > steps * len(units):
        raise Malformed(f"{what}: more observations than {steps} steps of {len(units)} units")
    for observation in observations:
        if not isinstance(observation, tuple) or len(observation) != 3:
            raise Malformed(f"{what}: an observation that is not (step, unit, values)")
        step, unit, value = observation
        check_int(step, f"{what}: an observation's step", 0, max(steps - 1, 0))
        check_int(unit, f"{what}: an observation's unit", units.start, units.stop - 1)
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.size <= OBSERVATION_NUMBERS
                and value.dtype.kind == "f" and np.isfinite(value).all()):
            raise Malformed(f"{what}: an observation that is not a finite vector of at most {OBSERVATION_NUMBERS} "
                            "numbers")


def check_sender(claimed: object, proved: int, what: str) -> None:
    if claimed != proved:
        raise Impersonation(f"{what}: names device {claimed!r}, but the sender is device {proved}")


def check_tensor(value: object, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise Malformed(f"{what}: a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise Malformed(f"{what}: {str(value.dtype).removeprefix('torch.')} {list(value.shape)[:8]}, expected "
                        f"{str(dtype).removeprefix('torch.')} {list(shape)}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise Malformed(f"{what}: holds NaN or infinite values")


def check_number(value: object, what: str, low: float = -math.inf, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            low <= value <= high):
        raise Malformed(f"{what}: {value!r} is not a finite number in [{low}, {high}]")


def check_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Malformed(f"{what}: {value!r} is not a whole number in [{low}, {high}]")
    return value
