"""The two halves of a split step (``device_forward``, ``edge_backward``) and the optimizer, which the device and edge
roles run; and ``reference_step``, the same maths in one call with both halves in this process: the yardstick the
running step (``engine.round.split_step``, which passes messages between the roles) is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smartsplit.kernels.saved import SavedBytes, count_saved_bytes


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the logical batch
    samples: int
    saved_bytes: int  # largest, over micro-batches, of what the device side saved for backward
    cut_bytes: int  # bytes that crossed to the edge, all micro-batches together (0 when the device ran every unit)


def reference_step(
    device_units: nn.Sequential,
    edge_units: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    device_opt: torch.optim.Optimizer | None,
    edge_opt: torch.optim.Optimizer | None,
    *,
    micro_batch: int | None = None,
    segments: tuple[tuple[int, int], ...] = (),
    saved_limit: int | None = None,
) -> StepResult:
    """Device forward to the cut, edge forward/backward and loss, gradient back, device backward; both step.

    The logical batch runs in micro-batches whose gradients accumulate (each one's cut activation crosses to
    the edge and its gradient comes back); the device recomputes its ``segments`` in backward instead of
    keeping their activations. With no edge units (cut = L) the loss is computed on the device's logits:
    exactly the plain FedAvg step. ``saved_limit`` is the guard: the device forward that saves more crosses
    it and raises ``DeviceOutOfMemory`` before the edge or any weight is touched.
    """
    for opt in (device_opt, edge_opt):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    n = len(y)
    step = micro_batch or n
    params = list(device_units.parameters())
    loss_sum, saved_peak, crossed = 0.0, 0, 0
    for start in range(0, n, step):
        xb, yb = x[start : start + step], y[start : start + step]
        with count_saved_bytes(exclude=[*params, xb], limit=saved_limit) as saved:
            activation = device_forward(device_units, xb, segments, saved)
        saved.discount(activation)  # the cut activation is counted apart, with its gradient

        loss, grad = edge_backward(edge_units, activation, yb, n)
        backward_into(activation, grad)  # the gradient returned over the link

        loss_sum += loss
        saved_peak = max(saved_peak, saved.total)
        if len(edge_units):
            crossed += activation.numel() * activation.element_size()
        del activation, grad  # only one micro-batch's cut tensors alive at a time
    for opt in (edge_opt, device_opt):
        if opt is not None:
            opt.step()
    return StepResult(loss=loss_sum, samples=n, saved_bytes=saved_peak, cut_bytes=crossed)


def backward_into(activation: torch.Tensor, grad: torch.Tensor) -> None:
    """The device's backward from its cut activation. Units with no parameters before the cut (a first unit
    that only reshapes, at cut 1) leave nothing to train: the activation carries no graph, and nothing runs."""
    if activation.requires_grad:
        activation.backward(grad)


def edge_backward(units: nn.Sequential, activation: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """The edge's half of one micro-batch: from the cut activation through ``units`` to the loss (this
    micro-batch's share of the mean over ``batch_size`` examples) and back; returns the loss share and the
    gradient to send the device. With no units the activation is the logits: the device's own loss."""
    received = activation.detach().requires_grad_(True)  # what the edge gets over the link
    loss = F.cross_entropy(units(received), labels, reduction="sum") / batch_size
    loss.backward()
    return loss.item(), received.grad


def own_loss_backward(logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """The loss of a device that holds every unit (this micro-batch's share of the mean over ``batch_size``), and
    its backward in one pass: ``edge_backward`` with no units then ``backward_into``, bit for bit, without the
    detached copy of the logits that crosses between them."""
    loss = F.cross_entropy(logits, labels, reduction="sum") / batch_size
    if loss.requires_grad:
        loss.backward()
    return loss.item()


def device_forward(units: nn.Sequential, x: torch.Tensor, segments: tuple[tuple[int, int], ...], saved: SavedBytes | None = None) -> torch.Tensor:
    """Run ``units``, checkpointing each (first, last) segment: only its input is kept for backward."""
    ends = dict(segments)
    h, l = x, 1
    while l <= len(units):
        if l in ends:
            if saved is not None:
                saved.add(h)  # the checkpoint holds its input until the segment's backward
            h = checkpoint(units[l - 1 : ends[l]], h, use_reentrant=False)
            l = ends[l] + 1
        else:
            h = units[l - 1](h)
            l += 1
    return h


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, momentum: float) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def start_optimizers(name: str) -> None:
    """Make and drop one optimizer of kind ``name``: a process's first imports ``torch._dynamo`` (0.9 s on a
    2-core machine), a start-up cost that a run pays before its first round rather than in it."""
    make_optimizer([nn.Parameter(torch.zeros(1))], name, 0.0, 0.0)
