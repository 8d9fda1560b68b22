"""Each role alone, driven by hand-made messages and checked against the same step done by hand; and every
message is what a transport would carry (tensors, arrays, numbers, strings)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_engine import BATCH, CLASSES, SGD, chain, dataset, device, manager_for

from smartsplit.kernels.aggregate import unit_states
from smartsplit.fleet import constant_trace
from smartsplit.roles.central import CentralRole, evaluate
from smartsplit.roles.device import DeviceRole, SimulatedTimes
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import Activation, EdgeInstructions, Gradient, RoundInstructions, UnitHandoff, Update
from smartsplit.strategies import Assignment, RoundPlan
from smartsplit.strategies.fixed_cut import fedavg


def plain(value) -> bool:
    """Only what a transport carries: tensors and arrays, numbers, strings, and containers of them."""
    if dataclasses.is_dataclass(value):
        return all(plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return all(isinstance(k, (int, str)) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor, np.ndarray))


def sgd_by_hand(units: torch.nn.Module) -> None:
    torch.optim.SGD(units.parameters(), lr=SGD.lr, momentum=SGD.momentum).step()


def test_device_role_alone_sends_its_activation_and_applies_the_returned_gradient() -> None:
    model, data = chain(), dataset()
    shard = np.arange(0, 40)
    role = DeviceRole(device(4), data, shard, constant_trace(10**9), manager_for(model), model, SGD, BATCH, 1, None)
    instructions = RoundInstructions(round=0, device_id=4, cut=1, weights=unit_states(model, 1, 1), checkpointing=False,
                                     replan=False, move_cut=False, batch_seed=(0, 0, 4), start_s=0.0)
    role.start_round(instructions)
    plan, handoff = role.plan_step(0.0)
    assert handoff is None and plan.cut == 1 and plan.micro_batch == BATCH
    assert role.begin_step(0)
    activation = role.forward(0)
    assert isinstance(activation, Activation) and plain(activation) and activation.last and activation.batch_size == BATCH
    (indices,) = role.local_batches(instructions)
    assert set(indices) <= set(shard) and torch.equal(activation.labels, data.y[indices])  # its own data only

    by_hand = copy.deepcopy(model[0])
    out = by_hand(data.x[indices])
    assert torch.equal(out, activation.tensor)
    returned = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    role.backward(Gradient(4, 0, 0, returned, loss=0.75))
    done = role.end_step()
    assert done.loss == 0.75 and done.samples == BATCH and done.cut_bytes == out.numel() * 4
    out.backward(returned)
    sgd_by_hand(by_hand)

    result = role.finish_round(SimulatedTimes(compute_s=1.5, finish_s=2.0, bytes_up=7))
    assert plain(result) and result.update.samples == {1: BATCH} and sorted(result.update.units) == [1]
    for key, value in by_hand.state_dict().items():
        assert torch.equal(result.update.units[1][key], value), key
    report = result.report
    assert (report.device, report.cut, report.steps, report.loss, report.compute_s, report.bytes_up) == (4, 1, 1, 0.75, 1.5, 7)
    assert not torch.equal(model[0][1].weight, by_hand[1].weight)  # the round never touches the global model


def test_edge_role_alone_answers_an_activation_with_the_gradient_and_trains_its_copy() -> None:
    model = chain()
    edge = EdgeRole(0, model, SGD)
    edge.start_round(EdgeInstructions(0, unit_states(model, 1, len(model)), {7: 1}, "shared"))
    edge.open_session(7)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn((BATCH, 8), generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    half = BATCH // 2
    answers = [edge.serve(Activation(7, 0, m, m == 1, x[m * half : (m + 1) * half], y[m * half : (m + 1) * half], BATCH))
               for m in (0, 1)]
    assert all(isinstance(a, Gradient) and plain(a) for a in answers)

    by_hand = copy.deepcopy(model[1:])
    received = x.clone().requires_grad_(True)
    loss = F.cross_entropy(by_hand(received), y, reduction="sum") / BATCH
    loss.backward()
    assert torch.allclose(torch.cat([a.tensor for a in answers]), received.grad, atol=1e-7)
    assert sum(a.loss for a in answers) == pytest.approx(loss.item(), rel=1e-6)
    sgd_by_hand(by_hand)

    assert edge.close_session(7) == (None, None, [])  # nothing handed over, no copy of its own, no observer
    update = edge.finish_round()
    assert isinstance(update, Update) and update.samples == {2: BATCH, 3: BATCH}
    for index, unit in zip((2, 3), by_hand):
        for key, value in unit.state_dict().items():
            assert torch.allclose(update.units[index][key], value, atol=1e-7), (index, key)


def test_edge_role_trains_units_a_device_hands_over_and_gives_them_back() -> None:
    model = chain()
    edge = EdgeRole(0, model, SGD)
    edge.start_round(EdgeInstructions(0, unit_states(model, 1, len(model)), {3: 2}, "per-device"))
    edge.open_session(3)
    moved = copy.deepcopy(model[1])
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1.0)  # the device's own copy of unit 2 differs from the global one
    edge.receive(UnitHandoff(3, {2: {k: v.clone() for k, v in moved.state_dict().items()}}))
    x, y = torch.randn((BATCH, 8)), torch.randint(0, CLASSES, (BATCH,))
    answer = edge.serve(Activation(3, 0, 0, True, x, y, BATCH))  # now from unit 1's output: units 2 and 3

    by_hand = torch.nn.Sequential(copy.deepcopy(moved), copy.deepcopy(model[2]))
    received = x.clone().requires_grad_(True)
    (F.cross_entropy(by_hand(received), y, reduction="sum") / BATCH).backward()
    assert torch.allclose(answer.tensor, received.grad, atol=1e-7)
    sgd_by_hand(by_hand)
    back, own, seen = edge.close_session(3)
    assert plain(back) and sorted(back.weights) == [2]
    assert torch.allclose(back.weights[2]["0.weight"], by_hand[0][0].weight, atol=1e-7)
    # the device's own server-side copy (units past its assigned cut 2) trained on its samples
    assert own.samples == {3: BATCH} and torch.allclose(own.units[3]["weight"], by_hand[1].weight, atol=1e-7)
    assert edge.finish_round() is None  # per-device copies: no shared one


def test_central_role_alone_instructs_aggregates_and_evaluates() -> None:
    model, data = chain(), dataset(40, seed=9)
    central = CentralRole(model, fedavg(len(model)), data, 16, seed=5, num_edges=2)
    plan = RoundPlan(assignments=(Assignment(0, 3), Assignment(3, 1)), excluded=0)
    devices, edges = central.instructions(2, plan, start_s=11.0)
    assert plain(devices) and plain(edges)
    assert [(i.device_id, i.cut, i.batch_seed, i.start_s) for i in devices] == [(0, 3, (5, 2, 0), 11.0), (3, 1, (5, 2, 3), 11.0)]
    assert sorted(devices[1].weights) == [1] and torch.equal(devices[1].weights[1]["1.weight"], model[0][1].weight)
    assert [e.cuts for e in edges] == [{0: 3}, {3: 1}] and all(e.copies == "shared" for e in edges)

    filled = lambda unit, value: {k: torch.full_like(v, value) for k, v in unit.state_dict().items()}  # noqa: E731
    on_edge_0 = [Update({1: filled(model[0], 1.0), 2: filled(model[1], 1.0), 3: filled(model[2], 1.0)}, {1: 10, 2: 10, 3: 10})]
    on_edge_1 = [Update({1: filled(model[0], 4.0)}, {1: 30}), Update({2: filled(model[1], 2.0), 3: filled(model[2], 2.0)}, {2: 30, 3: 30})]
    evaluation = central.finish_round(2, [on_edge_0, on_edge_1], [])
    assert torch.allclose(model[0][1].weight, torch.full_like(model[0][1].weight, (10 * 1.0 + 30 * 4.0) / 40))
    assert torch.allclose(model[2].bias, torch.full_like(model[2].bias, (10 * 1.0 + 30 * 2.0) / 40))
    by_hand = evaluate(model, data, 7)  # the batch size of evaluation changes only the loss's rounding
    assert evaluation.accuracy == by_hand.accuracy and evaluation.loss == pytest.approx(by_hand.loss, rel=1e-6)
