"""Rounds at the devices' own pace (``engine.freerun``): devices of different speeds, a device that goes offline,
and the same maths as lockstep wherever the order of arrival cannot matter."""

from __future__ import annotations

import time

import numpy as np
import torch

from smartsplit.engine.freerun import run_free
from smartsplit.engine.round import Participant, assemble, train_round
from smartsplit.fleet import AvailabilityTrace, constant_trace
from smartsplit.kernels.aggregate import unit_states
from smartsplit.messages import EdgeInstructions, RoundInstructions
from smartsplit.models.profile import profile_chain
from smartsplit.roles.device import DeviceRole
from smartsplit.roles.edge import EdgeRole
from test_engine import BATCH, EDGE, SGD, SHAPE, chain, dataset, device, manager_for

STEPS = 4


class Slow:
    """A device that takes ``delay_s`` more per forward than this machine does: a slower device class, as the
    engine sees it (the round engine under test, not an emulation of one)."""

    def __init__(self, role: DeviceRole, delay_s: float) -> None:
        self.role, self.delay_s = role, delay_s

    def forward(self, micro_batch: int):
        time.sleep(self.delay_s)
        return self.role.forward(micro_batch)

    def __getattr__(self, name: str):
        return getattr(self.role, name)


def _round(model, copies: str, cuts: dict[int, int], delays: dict[int, float], offline_at: dict[int, float]):
    data = dataset(n=128)
    edge = EdgeRole(0, model, SGD)
    edge.start_round(EdgeInstructions(0, unit_states(model, 1, 3), dict(cuts), copies))
    participants = []
    for i, cut in cuts.items():
        role = DeviceRole(device(i), data, np.arange(i * 32, (i + 1) * 32), constant_trace(10**9), manager_for(model),
                          model, SGD, BATCH, STEPS, None)
        side = Slow(role, delays[i]) if i in delays else role
        availability = AvailabilityTrace((0.0, offline_at[i]), (True, False)) if i in offline_at else None
        instructions = RoundInstructions(0, i, cut, unit_states(model, 1, cut), False, False, False, (0, 0, i), 0.0)
        participants.append(Participant(side, instructions, 0, availability))
    return participants, edge


def test_devices_of_different_speeds_and_one_going_offline_finish_the_round_at_their_own_pace() -> None:
    model = chain()
    profile = profile_chain(model, SHAPE, BATCH)
    participants, edge = _round(model, "shared", {0: 1, 1: 2, 2: 1}, delays={1: 0.05, 2: 0.05}, offline_at={2: 0.12})
    parts = run_free(participants, [edge], profile, start_s=0.0, deadline_wall_s=60.0)
    reports = {r.report.device: r.report for r in parts.results}
    fast, slow, gone = reports[0], reports[1], reports[2]
    assert fast.steps == slow.steps == STEPS and not fast.dropped_out and not slow.dropped_out
    assert slow.finish_s > STEPS * 0.05 > fast.finish_s  # measured: the slow device's forwards took their time
    assert gone.dropped_out and 0 < gone.steps < STEPS  # offline 0.12 s in: it stopped where it was
    outcome = assemble(parts, 1)
    (group,) = outcome.updates
    assert sorted(u.samples[1] for u in group if 1 in u.samples) == [gone.samples, STEPS * BATCH, STEPS * BATCH]
    assert all(torch.isfinite(v).all() for u in group for state in u.units.values() for v in state.values())


def test_with_a_copy_per_device_a_free_round_trains_what_lockstep_trains() -> None:
    """Per-device edge copies share nothing, so the order steps arrive in cannot matter: the updates are those of
    the lockstep engine, exactly, though one device went slower."""
    model = chain()
    profile = profile_chain(model, SHAPE, BATCH)
    cuts = {0: 1, 1: 2}
    free_parts, free_edge = _round(model, "per-device", cuts, delays={1: 0.02}, offline_at={})
    free = assemble(run_free(free_parts, [free_edge], profile, 0.0, 60.0), 1)
    lock_parts, lock_edge = _round(model, "per-device", cuts, delays={}, offline_at={})
    lockstep = train_round(lock_parts, [lock_edge], [EDGE], profile)
    assert len(free.updates[0]) == len(lockstep.updates[0]) == 4  # each device's update and its edge copy
    for a, b in zip(free.updates[0], lockstep.updates[0]):
        assert a.samples == b.samples and sorted(a.units) == sorted(b.units)
        for index in a.units:
            for name in a.units[index]:
                assert torch.equal(a.units[index][name], b.units[index][name]), (index, name)
