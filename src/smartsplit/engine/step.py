"""One split training step, the whole of it in one place (DESIGN 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smartsplit.memory.measure import count_saved_bytes


@dataclass(frozen=True)
class StepResult:
    loss: float
    samples: int
    saved_bytes: int  # bytes the device side really saved for backward (parameters and input excluded)
    cut_bytes: int  # bytes of the activation that crossed to the edge (0 when the device ran every unit)


def split_step(
    device_units: nn.Sequential,
    edge_units: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    device_opt: torch.optim.Optimizer | None,
    edge_opt: torch.optim.Optimizer | None,
    saved_limit: int | None = None,
) -> StepResult:
    """Device forward to the cut, edge forward/backward and loss, gradient back, device backward; both step.

    With no edge units (cut = L) the loss is computed on the logits the device produced: exactly the plain
    FedAvg step, since the chain rule through the detached cut is the identity. ``saved_limit`` guards the
    device forward: crossing it raises ``DeviceOutOfMemory`` before the edge or any weight is touched.
    """
    for opt in (device_opt, edge_opt):
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    with count_saved_bytes(exclude=[*device_units.parameters(), x], limit=saved_limit) as saved:
        activation = device_units(x)

    received = activation.detach().requires_grad_(True)  # what the edge gets over the link
    loss = F.cross_entropy(edge_units(received), y)
    loss.backward()
    if edge_opt is not None:
        edge_opt.step()

    activation.backward(received.grad)  # the gradient returned over the link
    if device_opt is not None:
        device_opt.step()

    crossed = 0 if len(edge_units) == 0 else activation.numel() * activation.element_size()
    return StepResult(loss=loss.item(), samples=len(y), saved_bytes=saved.total, cut_bytes=crossed)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, momentum: float) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)
