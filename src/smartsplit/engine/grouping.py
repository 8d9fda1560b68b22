"""Which of a round's devices step together (``kernels.grouped``), and the steps they defer until then.

A device may be grouped when it trains its whole model alone (its cut is the last unit, it may not move it, no
strategy observer watches its steps), with SGD, and shares its steps' batch sizes with other devices of the
round. While it may, the simulated round runs as always (plans, budgets, the clock, out-of-memory checks at a
step's start, drop-outs) but its steps' arithmetic waits; when the round's simulation ends, every group's
waiting steps run together, step by step, and the devices report. A waiting step needs the plain plan (the
whole batch at once, nothing recomputed) at a budget that holds its peak; a device whose plan or budget stops
allowing that runs its waiting steps one at a time there and then, and goes on alone.

Whether grouping pays is measured, not assumed: ``mode: auto`` times a group's steps one client at a time and
together once per model, input shape, batch, group size (a power of two) and compute device on this machine (kept in the cache,
so a machine decides once and every later run decides the same), and groups when together is at least
``MARGIN`` times faster. ``always`` always groups (tests, GPUs), ``never`` never does. Each decision is recorded in
``choices``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from smartsplit.kernels.grouped import Stacked, time_both
from smartsplit.machine import describe, one_line
from smartsplit.meter.heap import cached_json, structure, torch_version
from smartsplit.roles.device import DeviceRole

MARGIN = 1.5  # together must be this much faster: grouping changes the rounding, so only a clear gain pays for it


class Grouping:
    def __init__(self, mode: str, device: str, architecture, input_shape: tuple[int, ...], num_classes: int) -> None:
        self.mode, self.device = mode, device
        self.architecture, self.input_shape, self.num_classes = architecture, tuple(input_shape), num_classes
        self.choices: dict[tuple[int, int], dict] = {}  # (batch, clients) -> the measurement and the choice

    def pays(self, batch: int, clients: int) -> bool:
        """Whether ``clients`` devices' steps at ``batch`` examples should run together. ``auto`` times groups of
        a power of two of clients (``clients`` rounded up), so a fleet whose rounds vary in size is timed a few
        times, not once per size."""
        if self.mode != "auto":
            return self.mode == "always"
        clients = 1 << (clients - 1).bit_length()
        key = (batch, clients)
        if key not in self.choices:
            timing = cached_json("grouping", "timing", [one_line(describe()), torch_version(), self.device,
                                                        structure(self.architecture), self.input_shape, batch, clients],
                                 lambda: self._measure(batch, clients))
            self.choices[key] = {**timing, "grouped": timing["one_at_a_time_s"] >= MARGIN * timing["together_s"]}
        return self.choices[key]["grouped"]

    def _measure(self, batch: int, clients: int) -> dict:
        timing = time_both(self.architecture, self.input_shape, batch, clients, self.num_classes, self.device, repeats=1)
        return {"clients": clients, "one_at_a_time_s": timing.one_at_a_time_s, "together_s": timing.together_s}

    def record(self) -> dict:
        """What was chosen, for the run's summary: the mode, the compute device and each measured choice."""
        return {"mode": self.mode, "device": self.device,
                "choices": [{"batch": b, **choice} for (b, _), choice in sorted(self.choices.items())]}

    def defer(self, roles: Sequence[DeviceRole], instructions, num_units: int, batch: int) -> None:
        """Let the devices that may be grouped defer their steps' arithmetic (see the module docstring)."""
        group = [role for role, i in zip(roles, instructions) if isinstance(role, DeviceRole) and i.cut == num_units
                 and not i.move_cut and role.optimizer.name == "sgd"]
        if len(group) > 1 and self.pays(batch, len(group)):
            for role in group:
                role.deferring = True

    def run(self, roles: Sequence[DeviceRole]) -> None:
        """The waiting steps of ``roles``, step by step: at each, the devices whose batches have the same size
        step together; a group that stays the same from one step to the next keeps its weights stacked."""
        clients = [role.deferred_client() for role in roles]
        losses: list[list[float]] = [[] for _ in roles]
        spec = roles[0].optimizer
        stacks: dict[tuple[int, ...], Stacked] = {}
        for step in range(max(role.deferred_steps for role in roles)):
            batches = {k: role.deferred_batch(step) for k, role in enumerate(roles) if role.deferred_steps > step}
            alike: dict[int, list[int]] = defaultdict(list)
            for k, (_, y) in batches.items():
                alike[len(y)].append(k)
            groups = [tuple(members) for members in alike.values()]
            for key in [key for key in stacks if key not in groups]:  # the group split up: its weights go back
                stacks.pop(key).write_back()
            for key in groups:
                stacked = stacks.get(key) or stacks.setdefault(key, Stacked([clients[k] for k in key], self.device))
                xs = torch.stack([batches[k][0] for k in key])
                ys = torch.stack([batches[k][1] for k in key])
                for k, loss in zip(key, stacked.step(xs, ys, spec.lr, spec.momentum)):
                    losses[k].append(loss)
        for stacked in stacks.values():
            stacked.write_back()
        for role, client, own in zip(roles, clients, losses):
            role.finish_deferred(client, own)


def grouped_compute_unavailable(device: str) -> str | None:
    """Why grouped steps cannot be computed on ``device`` here (None: they can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "device: cuda, but torch sees no CUDA GPU here (a CPU build of torch, or no GPU): use device: cpu"
    return None
