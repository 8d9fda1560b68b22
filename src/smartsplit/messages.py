"""What the roles send each other: tensors, numbers and strings only, as a transport would carry them.

A round, for one device (``D``), its edge server (``E``) and the central server (``C``)::

    C -> E   EdgeInstructions   the global weights of the units the edge will train, and its devices' cuts
    C -> D   RoundInstructions  the device's cut, the weights of its units, how it may plan, its batch seed
    D -> E   UnitHandoff        (only when squeezed) units, with optimizer state, the device gives up mid-round
    D -> E   Activation         every micro-batch: the cut activation and its labels
    E -> D   Gradient           the gradient of the loss with respect to that activation
    E -> D   UnitHandoff        at the round's end, the units the device gave up, trained on
    D -> C   Update             the device's trained units and how many samples trained each
    E -> C   Update             the edge's server-side copy (shared, or one per device)
    D -> C   DeviceReport       what the device did (``smartsplit.records``), and its step observations
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from smartsplit.records import DeviceReport

UnitWeights = dict[int, dict[str, torch.Tensor]]  # 1-based unit index -> the unit's state dict
Observation = tuple[int, int, object]  # (local step, unit, what the strategy's step observer returned)


@dataclass(frozen=True)
class RoundInstructions:
    """Central -> device: train units 1..cut from these weights for this round."""

    round: int
    device_id: int
    cut: int
    weights: UnitWeights  # units 1..cut
    checkpointing: bool  # the plan rules: micro-batches and recomputation allowed
    replan: bool  # re-plan whenever the budget changes
    move_cut: bool  # hand units to the edge when nothing fits at the cut
    batch_seed: tuple[int, ...]  # seeds the order of the device's local batches
    start_s: float  # the round's start on the experiment's clock (where budget traces are read)


@dataclass(frozen=True)
class EdgeInstructions:
    """Central -> edge: this round's weights and which devices train through this edge at which cut."""

    round: int
    weights: UnitWeights  # every unit a device of this edge may hand over or the edge trains
    cuts: dict[int, int]  # device id -> cut
    copies: str  # "shared" (one server-side copy for all the edge's devices) or "per-device"


@dataclass(frozen=True)
class Activation:
    """Device -> edge: one micro-batch's cut activation."""

    device_id: int
    step: int  # the device's local step, from 0
    micro_batch: int  # index within the step, from 0
    last: bool  # the step's last micro-batch: the edge steps its optimizer after it
    tensor: torch.Tensor
    labels: torch.Tensor
    batch_size: int  # examples in the whole step (the loss is a mean over them)


@dataclass(frozen=True)
class Gradient:
    """Edge -> device: d(loss)/d(activation) for one micro-batch, and that micro-batch's share of the loss."""

    device_id: int
    step: int
    micro_batch: int
    tensor: torch.Tensor
    loss: float


@dataclass(frozen=True)
class UnitHandoff:
    """Units (1-based, contiguous) moving between a device and its edge with their optimizer state."""

    device_id: int
    weights: UnitWeights
    optimizer_state: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)  # unit -> param -> state


@dataclass(frozen=True)
class Update:
    """Trained copies of some units and the number of samples that trained each of them."""

    units: UnitWeights
    samples: dict[int, int]  # 1-based unit index -> samples that trained this copy


@dataclass(frozen=True)
class DeviceResult:
    """Device -> central at the round's end: its update (None when it finished no step), report and observations."""

    update: Update | None
    report: DeviceReport
    observations: list[Observation]
