"""Which of a round's devices step together (``kernels.grouped``), and the steps they defer until then.

A device may be grouped when its step is the whole model's step and depends on no other device: it trains its whole
model alone (its cut is the last unit), or it is split and its edge keeps a server-side copy for it alone
(``edge_copies: per-device``, SplitFed-v1's way); it may not move its cut, no strategy observer watches its steps,
it trains with SGD, and it shares its steps' batch sizes with other devices of the round. A split device's units are
then held in two places, the device's and its copy at the edge (``EdgeRole.own_copy``), and its waiting steps train
both; since every such step is the whole model's, devices of every cut stack into one computation (grouping by cut
would only make smaller groups of the same arithmetic). Devices that share a server-side copy (SplitFed-v2,
SmartSplit) are never grouped: the copy trains on their steps in simulated arrival order. While a device may wait,
the simulated round runs as always (plans, budgets, the clock, out-of-memory checks at a step's start, drop-outs)
but its steps' arithmetic waits; when the round's simulation ends, every group's waiting steps run together, step by
step, and the devices report. A waiting step needs the plain plan (the whole batch at once, nothing recomputed) at a
budget that holds its peak; a device whose plan or budget stops allowing that runs its waiting steps one at a time
there and then, and goes on alone.

Whether grouping pays is measured, not assumed: ``mode: auto`` times a group's steps one client at a time and
together once per model, input shape, batch, group size (a power of two) and compute device on this machine (kept in
the cache, so a machine decides once and every later run decides the same), and groups when together is at least
``MARGIN`` times faster. ``always`` always groups (tests, GPUs), ``never`` never does. Each decision is recorded in
``choices``.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import TYPE_CHECKING, Sequence

import torch

from smartsplit.kernels.grouped import Stacked, time_both
from smartsplit.machine import describe, one_line
from smartsplit.meter.heap import cached_json, structure, torch_version
from smartsplit.models.profile import ModelProfile
from smartsplit.roles.device import DeviceRole
from smartsplit.roles.edge import EdgeRole

if TYPE_CHECKING:
    from smartsplit.engine.round import Participant

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

    def defer(self, participants: Sequence[Participant], edge_roles: Sequence[EdgeRole], profile: ModelProfile,
              edge_copies: str) -> None:
        """Let the devices that may be grouped defer their steps' arithmetic (see the module docstring)."""
        group = [p for p in participants if isinstance(p.role, DeviceRole) and not p.instructions.move_cut
                 and (p.instructions.cut == profile.num_units or edge_copies == "per-device")
                 and p.role.optimizer.name == "sgd"]
        if len(group) > 1 and self.pays(profile.batch, len(group)):
            for p in group:
                cut = p.instructions.cut
                if cut == profile.num_units:
                    p.role.wait()
                else:  # its copy at the edge exists once its round starts there
                    p.role.wait(partial(edge_roles[p.edge].own_copy, p.role.id), profile.cut_bytes(cut) // profile.batch)

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
