"""Many clients' local steps as one computation.

Clients that train the same units on batches of the same shape are stacked along a leading client dimension
and stepped together: ``torch.func.vmap`` of ``grad`` over ``functional_call``, so one call computes every
client's loss and gradient with its own weights, then one SGD update over the stacked tensors updates them all.
The maths is each client's plain step (loss summed over its batch / its batch size, SGD with momentum as
``torch.optim.SGD`` does it); only the floating-point order differs, so results equal one client at a time
within rounding (``tests/test_grouped.py`` states the tolerance).

``Stacked`` keeps a group's stacked weights (on the CPU or a GPU) across its steps; ``step_together`` is one step.
``time_both`` times both ways on stand-in weights, which is how an engine decides whether grouping pays.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from smartsplit.kernels.structure import with_stand_ins


@dataclass
class Client:
    """One client's units (real weights, trained in place) and its SGD momentum buffers (None before its first
    step with momentum), by parameter name."""

    units: nn.Module
    momentum: dict[str, torch.Tensor] | None = None


def _loss(structure: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    loss = F.cross_entropy(functional_call(structure, params, (x,)), y, reduction="sum") / len(y)
    return loss, loss.detach()


class Stacked:
    """Clients' weights (and momentum) stacked on ``device``, stepped together as many times as asked, then
    written back to the clients (``write_back``): a group that stays together moves its weights once."""

    def __init__(self, clients: list[Client], device: torch.device | str = "cpu") -> None:
        self.clients, self.device = clients, torch.device(device)
        structure = clients[0].units
        self.compute = structure if self.device.type == "cpu" else copy.deepcopy(structure).to(self.device)
        self.names = [name for name, _ in structure.named_parameters()]
        own = [dict(c.units.named_parameters()) for c in clients]
        # contiguous: vmap's batching rules refuse channels-last layouts (``in_memory_format``) in places
        self.params = {n: torch.stack([o[n].detach() for o in own]).to(self.device).contiguous() for n in self.names}
        first = clients[0].momentum
        self.momentum = None if first is None else {
            n: torch.stack([c.momentum[n] for c in clients]).to(self.device) for n in self.names}
        self.grads: dict[str, torch.Tensor] = {}
        self._grad = vmap(grad(lambda p, x, y: _loss(self.compute, p, x, y), has_aux=True))

    def step(self, xs: torch.Tensor, ys: torch.Tensor, lr: float, momentum: float) -> list[float]:
        """One step of every client: client ``k`` on ``xs[k]``, ``ys[k]``; returns each one's loss."""
        self.grads, losses = self._grad(self.params, xs.to(self.device), ys.to(self.device))
        with torch.no_grad():
            for n in self.names:
                g = self.grads[n]
                if momentum:  # torch.optim.SGD's: the first step's buffer is the gradient itself
                    if self.momentum is None:
                        self.momentum = {}
                    buffer = self.momentum.get(n)
                    g = self.momentum[n] = g.clone() if buffer is None else buffer.mul_(momentum).add_(g)
                self.params[n].add_(g, alpha=-lr)
        return losses.tolist()

    def write_back(self) -> None:
        """Each client's weights, its last step's gradient (as a plain step leaves it) and its momentum."""
        with torch.no_grad():
            for k, c in enumerate(self.clients):
                for n, p in c.units.named_parameters():
                    p.copy_(self.params[n][k])
                    if n in self.grads:
                        p.grad = self.grads[n][k].to("cpu", copy=True)
                if self.momentum is not None:
                    c.momentum = {n: self.momentum[n][k].to("cpu", copy=True) for n in self.names}


def step_together(clients: list[Client], xs: torch.Tensor, ys: torch.Tensor, lr: float, momentum: float,
                  device: torch.device | str = "cpu") -> list[float]:
    """One local step of every client at once (``Stacked``), written back; returns each client's loss."""
    stacked = Stacked(clients, device)
    losses = stacked.step(xs, ys, lr, momentum)
    stacked.write_back()
    return losses


@dataclass(frozen=True)
class Timing:
    """Seconds for ``clients`` clients' steps, one at a time and together (best of ``repeats``)."""

    clients: int
    one_at_a_time_s: float
    together_s: float

    @property
    def speedup(self) -> float:
        return self.one_at_a_time_s / self.together_s


def time_both(structure: nn.Module, input_shape: tuple[int, ...], batch: int, clients: int, num_classes: int,
              device: torch.device | str = "cpu", repeats: int = 3) -> Timing:
    """Time ``clients`` steps of ``structure`` (stand-in weights, random batches of ``batch`` examples of
    ``input_shape``) one client at a time and together, on ``device``; the first of each is a warm-up."""
    units = [copy.deepcopy(with_stand_ins(structure, torch.Generator().manual_seed(k))).to(device) for k in range(clients)]
    xs = torch.randn(clients, batch, *input_shape, device=device)
    ys = torch.randint(0, num_classes, (clients, batch), device=device)
    optimizers = [torch.optim.SGD(u.parameters(), lr=0.0) for u in units]

    def alone() -> None:
        for u, o, x, y in zip(units, optimizers, xs, ys):
            o.zero_grad(set_to_none=True)
            (F.cross_entropy(u(x), y, reduction="sum") / len(y)).backward()
            o.step()

    stacked = Stacked([Client(u.cpu()) for u in copy.deepcopy(units)], device)
    return Timing(clients, _best(alone, repeats, device), _best(lambda: stacked.step(xs, ys, 0.0, 0.0), repeats, device))


def _best(run, repeats: int, device) -> float:
    best = float("inf")
    for attempt in range(repeats + 1):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first is a warm-up
            best = min(best, time.perf_counter() - started)
    return best
