"""Split step, layer-wise aggregation, interleaved rounds, the memory guard, strategies, determinism."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smartsplit.engine.round as round_mod
from smartsplit.config import build_config
from smartsplit.data import Dataset
from smartsplit.kernels.aggregate import aggregate, unit_states
from smartsplit.engine.experiment import Experiment
from smartsplit.strategies.options import EngineOptions
from smartsplit.engine.round import Participant, train_round
from smartsplit.kernels.step import reference_step
from smartsplit.fleet import AvailabilityTrace, BudgetTrace, Device, constant_trace
from smartsplit.fleet.clock import EdgeSpec, step_times
from smartsplit.strategies.smartsplit import SmartSplit
from smartsplit.memory.model import activation_bytes, device_memory
from smartsplit.memory.ondevice import OnDeviceManager
from smartsplit.meter.held import held_bytes
from smartsplit.models.profile import ProfileCache, profile_chain
from smartsplit.roles.device import DeviceRole, OptimizerSpec, SimulatedTimes
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import EdgeInstructions, RoundInstructions, Update
from smartsplit.strategies import Candidate
from smartsplit.strategies.fixed_cut import FixedCut, fedavg, splitfed

SHAPE = (1, 4, 4)
CLASSES = 3
BATCH = 8


def chain(seed: int = 0) -> nn.Sequential:
    """Three units; unit 1 saves an activation of its own (its ReLU output)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Linear(8, CLASSES),
    )


def dataset(n: int = 64, seed: int = 1) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset("toy", torch.randn((n, *SHAPE), generator=g), torch.randint(0, CLASSES, (n,), generator=g), CLASSES)


def device(i: int, memory: int = 10**9, flops: float = 1e6) -> Device:
    return Device(i, "test", memory, flops, 1e5, 1e5)


EDGE = EdgeSpec(flops_per_s=1e7, latency_s=0.01)
SGD = OptimizerSpec("sgd", 0.1, 0.0, 0)




def plain_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer | None) -> float:
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if opt is not None:
        opt.step()
    return loss.item()


# --------------------------------------------------------------------------- split step


def test_split_step_at_cut_L_is_the_plain_step() -> None:
    data = dataset()
    x, y = data.x[:BATCH], data.y[:BATCH]
    split, plain = chain(), chain()
    split_opt = torch.optim.SGD(split.parameters(), lr=0.1, momentum=0.5)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        r = reference_step(split, nn.Sequential(), x, y, split_opt, None)
        loss = plain_step(plain, x, y, plain_opt)
        assert r.loss == pytest.approx(loss, rel=1e-6)
        assert r.cut_bytes == 0 and r.samples == BATCH and r.saved_bytes > 0
        for (name, a), b in zip(split.named_parameters(), plain.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-7), name
            assert torch.allclose(a, b, atol=1e-7), name
    assert not torch.equal(split[0][1].weight, chain()[0][1].weight)  # it did train


@pytest.mark.parametrize("cut", [1, 2])
def test_split_step_grads_equal_whole_model_grads(cut: int) -> None:
    data = dataset()
    x, y = data.x[:BATCH], data.y[:BATCH]
    split, whole = chain(), chain()
    r = reference_step(split[:cut], split[cut:], x, y, None, None)  # no optimizers: grads stay for inspection
    loss = plain_step(whole, x, y, None)
    assert r.loss == pytest.approx(loss, rel=1e-6)
    assert r.cut_bytes == BATCH * 8 * 4  # both cut activations are B x 8 floats
    for (name, a), b in zip(split.named_parameters(), whole.parameters()):
        assert a.grad is not None, name
        assert torch.allclose(a.grad, b.grad, atol=1e-7), name


def test_split_step_updates_equal_plain_updates_at_intermediate_cut() -> None:
    data = dataset()
    split, whole = chain(), chain()
    dev_opt = torch.optim.SGD(split[:1].parameters(), lr=0.1)
    edge_opt = torch.optim.SGD(split[1:].parameters(), lr=0.1)
    opt = torch.optim.SGD(whole.parameters(), lr=0.1)
    for s in range(3):
        x, y = data.x[s * BATCH : (s + 1) * BATCH], data.y[s * BATCH : (s + 1) * BATCH]
        reference_step(split[:1], split[1:], x, y, dev_opt, edge_opt)
        plain_step(whole, x, y, opt)
    for a, b in zip(split.parameters(), whole.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_split_step_saved_bytes_match_the_memory_model(cut: int) -> None:
    """The guard's measured saved bytes equal the predicted activations (raw batch and cut activation apart)."""
    data = dataset()
    model = chain()
    profile = profile_chain(model, SHAPE, BATCH)
    r = reference_step(model[:cut], model[cut:], data.x[:BATCH], data.y[:BATCH], None, None)
    assert r.saved_bytes == activation_bytes(profile, cut)


# --------------------------------------------------------------------------- aggregation


def filled(unit: nn.Module, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in unit.state_dict().items()}


def test_aggregate_mixed_cuts_by_hand() -> None:
    torch.manual_seed(0)
    g = nn.Sequential(*(nn.Linear(2, 2) for _ in range(4)))
    untouched = {k: v.clone() for k, v in g[3].state_dict().items()}
    dev_a = Update(units={1: filled(g[0], 1.0)}, samples={1: 10})  # cut 1
    dev_b = Update(units={1: filled(g[0], 3.0), 2: filled(g[1], 5.0)}, samples={1: 30, 2: 30})  # cut 2
    # the edge trained unit 2 on device a's 10 samples and unit 3 on both (40); nobody trained unit 4
    edge = Update(units={2: filled(g[1], 1.0), 3: filled(g[2], -2.0)}, samples={2: 10, 3: 40})
    aggregate(g, [dev_a, dev_b, edge])
    expected = {0: (10 * 1.0 + 30 * 3.0) / 40, 1: (30 * 5.0 + 10 * 1.0) / 40, 2: -2.0}
    for i, value in expected.items():
        for k, v in g[i].state_dict().items():
            assert torch.allclose(v, torch.full_like(v, value)), (i, k)
    for k, v in g[3].state_dict().items():
        assert torch.equal(v, untouched[k])


def test_aggregate_ignores_zero_sample_copies() -> None:
    g = nn.Sequential(nn.Linear(2, 2))
    aggregate(g, [Update({1: filled(g[0], 2.0)}, {1: 5}), Update({1: filled(g[0], 100.0)}, {1: 0})])
    assert torch.allclose(g[0].weight, torch.full((2, 2), 2.0))


def test_aggregate_all_cuts_at_L_is_fedavg() -> None:
    base = chain()
    copies, samples = [chain(s) for s in (1, 2, 3)], [8, 24, 13]
    contribs = [Update(unit_states(c, 1, 3), {i: n for i in (1, 2, 3)}) for c, n in zip(copies, samples)]
    aggregate(base, contribs)
    total = sum(samples)
    for name, merged in base.state_dict().items():
        want = sum(c.state_dict()[name].double() * n / total for c, n in zip(copies, samples))
        assert torch.allclose(merged.double(), want, atol=1e-6), name


def test_unit_states_are_detached_copies() -> None:
    c = chain()
    states = unit_states(c, 2, 3)
    assert sorted(states) == [2, 3]
    with torch.no_grad():
        c[2].weight.add_(1.0)
    assert not torch.equal(states[3]["weight"], c[2].weight)


# --------------------------------------------------------------------------- train_round


@dataclasses.dataclass
class Spec:
    """A hand-made participant: its device, cut, exact local batches, budget trace and on-device manager."""

    device: Device
    cut: int
    batches: list[np.ndarray]
    trace: BudgetTrace
    manager: OnDeviceManager
    replan: bool = False
    move_cut: bool = False
    edge: int = 0
    availability: AvailabilityTrace | None = None


class ScriptedDevice(DeviceRole):
    """A device role whose local batches are given rather than drawn from its shard."""

    def __init__(self, *args, batches: list[np.ndarray], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scripted = batches

    def local_batches(self, instructions: RoundInstructions) -> list[np.ndarray]:
        return self.scripted


def play_round(model, specs: list[Spec], data, profile, edges: list[EdgeSpec], opt: OptimizerSpec, *, start_s=0.0,
               deadline_s=None, edge_copies="shared", edge_order="interleaved", observer=None, measure=None):
    """One round of hand-made participants through the device, edge and round engine: each edge's updates,
    the device reports (as metrics.jsonl has them) and the step observations per device."""
    edge_roles = [EdgeRole(e, model, opt) for e in range(len(edges))]
    for e, role in enumerate(edge_roles):
        role.start_round(EdgeInstructions(0, unit_states(model, 1, len(model)),
                                          {s.device.id: s.cut for s in specs if s.edge == e}, edge_copies), observer)
    participants = []
    for s in specs:
        role = ScriptedDevice(s.device, data, np.arange(len(data)), s.trace, s.manager, model, opt, BATCH, len(s.batches),
                              None, measure=measure, batches=s.batches)
        instructions = RoundInstructions(0, s.device.id, s.cut, unit_states(model, 1, s.cut), s.manager.checkpointing,
                                         s.replan, s.move_cut, (0, 0, s.device.id), start_s)
        participants.append(Participant(role, instructions, s.edge, s.availability))
    outcome = train_round(participants, edge_roles, edges, profile, start_s=start_s, deadline_s=deadline_s,
                        options=EngineOptions(edge_copies, edge_order), observer=observer)
    return outcome.updates, [r.to_json() for r in outcome.reports], outcome.observations


def batches(*sizes: int, start: int = 0) -> list[np.ndarray]:
    out, pos = [], start
    for s in sizes:
        out.append(np.arange(pos, pos + s))
        pos += s
    return out


def part(model: nn.Sequential, dev: Device, cut: int, budget: int, steps: list[np.ndarray], *,
         smart: bool = False, slots: int = 0, meter=None) -> Participant:
    """A participant with a constant budget; ``smart``: the on-device manager plans, re-plans and moves cuts
    (as under SmartSplit), else the plain plan of the baselines. With a ``meter``, plans rest on its figures."""
    cache = ProfileCache(meter, (SGD.name, SGD.lr, SGD.momentum))
    manager = OnDeviceManager(
        lambda m: cache.get("toy", model, SHAPE, m), BATCH, slots, dev.flops_per_s,
        round_trip_s=2 * EDGE.latency_s, checkpointing=smart,
    )
    return Spec(dev, cut, steps, constant_trace(budget), manager, replan=smart, move_cut=smart)



def round_on_one_edge(model, parts, data, profile, edge, opt, **kwargs):
    """train_round with a single edge server: its contributions and the device reports."""
    groups, reports, _ = play_round(model, parts, data, profile, [edge], opt, **kwargs)
    return groups[0], reports

def test_run_round_interleaves_devices_on_the_shared_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    cut, steps = 1, 3
    order: list[int] = []
    real_step = round_mod.split_step

    def recording_step(device, edge, step):
        order.append(device.id)
        return real_step(device, edge, step)

    monkeypatch.setattr(round_mod, "split_step", recording_step)
    parts = [
        part(model, device(0), cut, 10**9, batches(*[BATCH] * steps, start=0)),
        part(model, device(1), cut, 10**9, batches(*[BATCH] * steps, start=32)),
    ]
    before = copy.deepcopy(model.state_dict())
    contributions, reports = round_on_one_edge(model, parts, data, profile, EDGE, SGD)

    # the global model is not touched by the round itself
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # steps reach the edge in order of simulated arrival: a, b, a, b, ... never a's whole round first
    assert len(order) == 2 * steps and len(set(order)) == 2
    assert order == [order[0], order[1]] * steps

    t = step_times(profile, cut, device(0), EDGE)
    assert [r["device"] for r in reports] == [0, 1]
    for r in reports:
        assert r["steps"] == steps and r["samples"] == steps * BATCH and r["oom_events"] == 0 and r["cut"] == cut
        # the device's time is its own compute and transfers, its queueing, and the edge serving it
        assert r["finish_s"] == pytest.approx(r["compute_s"] + r["comm_s"] + r["wait_s"] + steps * t.edge_s)
        assert r["bytes_up"] == steps * profile.cut_bytes(cut) + profile.param_bytes(1, cut)
        assert r["bytes_down"] == steps * profile.cut_bytes(cut) + profile.param_bytes(1, cut)
        assert r["peak_measured_mb"] is None and 0 < r["peak_predicted_mb"]  # no meter in this round
    # identical devices arrive together: the second one queues behind the first for one edge step
    a, b = reports
    assert a["wait_s"] == pytest.approx(0.0, abs=1e-12)
    assert b["wait_s"] == pytest.approx(t.edge_s)
    assert b["finish_s"] - a["finish_s"] == pytest.approx(t.edge_s)

    # the shared edge copy trained units 2..3 on both devices' samples
    edge = [c for c in contributions if 3 in c.units]
    assert len(edge) == 1 and edge[0].samples == {2: 2 * steps * BATCH, 3: 2 * steps * BATCH}
    devs = [c for c in contributions if 3 not in c.units]
    assert sorted(c.samples[1] for c in devs) == [steps * BATCH] * 2
    assert not torch.equal(edge[0].units[3]["weight"], model[2].weight)


def test_run_round_at_cut_L_is_fedavg_by_hand() -> None:
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    opt = OptimizerSpec("sgd", 0.1, 0.5, 1)
    plan = [batches(BATCH, BATCH, start=0), batches(BATCH, BATCH, 5, start=20)]
    parts = [part(model, device(i), 3, 10**9, b, slots=1) for i, b in enumerate(plan)]

    by_hand, weights = [], []
    for b in plan:
        local = copy.deepcopy(model)
        sgd = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.5)
        for idx in b:
            plain_step(local, data.x[idx], data.y[idx], sgd)
        by_hand.append(local.state_dict())
        weights.append(sum(len(idx) for idx in b))
    assert weights == [16, 21]

    contributions, reports = round_on_one_edge(model, parts, data, profile, EDGE, opt)
    assert [r["samples"] for r in reports] == weights
    assert all(r["bytes_up"] == profile.param_bytes(1, 3) for r in reports)  # only the model travels
    assert all(r["wait_s"] == 0 for r in reports)  # the edge is not used at cut = L
    assert len(contributions) == 2  # no edge copy
    aggregate(model, contributions)
    total = sum(weights)
    for name, v in model.state_dict().items():
        want = sum(s[name].double() * n / total for s, n in zip(by_hand, weights))
        assert torch.allclose(v.double(), want, atol=1e-6), name


def test_each_device_sketches_its_own_steps_on_the_shared_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three devices at mixed cuts on one shared edge copy, their steps interleaved and queued: each device's
    step observations, of its own units (taken on the device) and of the shared edge units (taken on the edge),
    are the gradients of its own steps, read while it held the edge (not after another device's step had
    refilled the shared gradients)."""
    from smartsplit.strategies.mec import GradientSketches, UpdateSketcher, step_sketches

    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    sketcher = UpdateSketcher(model, 16, seed=0)
    steps: dict[int, list[list[np.ndarray]]] = {}  # by device: each step's grad sketches, read right after it
    real_step = round_mod.split_step

    def recording_step(device, edge, step):
        result = real_step(device, edge, step)
        session = edge._sessions[device.id]  # white box: the units this device's step just trained
        units = [*device._state.units[: device.cut], *session.units[session.cut :]]
        steps.setdefault(device.id, []).append([sketcher.grad_sketch(i, u) for i, u in enumerate(units, 1)])
        return result

    monkeypatch.setattr(round_mod, "split_step", recording_step)
    parts = [part(model, device(k), cut, 10**9, batches(BATCH, BATCH, BATCH, start=20 * k)) for k, cut in enumerate([1, 2, 1])]
    _, _, observations = play_round(model, parts, data, profile, [EDGE], SGD, observer=GradientSketches(sketcher))
    assert sorted(observations) == [0, 1, 2] and len(steps) == 3
    for device_id, seen in observations.items():
        units = step_sketches(seen)
        assert all(units[u].steps == 3 for u in (1, 2, 3))
        own = [sum(step[u] for step in steps[device_id]) for u in range(3)]
        assert all(np.array_equal(units[u + 1].total, own[u]) for u in range(3)), f"device {device_id}: not its own steps"
        others = [sum(step[2] for step in steps[d]) for d in steps if d != device_id]
        assert not any(np.allclose(units[3].total, o) for o in others)


def test_memory_guard_reports_oom_and_no_steps() -> None:
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    need = device_memory(profile, 2, slots=0)
    assert need.activations > 0
    tight = need.total - need.activations // 2  # the weights fit, the activations don't
    parts = [
        part(model, device(0), 2, tight, batches(BATCH, BATCH, start=0)),
        part(model, device(1), 2, 10**9, batches(BATCH, BATCH, start=16)),
    ]
    before = copy.deepcopy(model.state_dict())
    contributions, (starved, ok) = round_on_one_edge(model, parts, data, profile, EDGE, SGD)
    assert starved["oom_events"] > 0 and starved["steps"] == 0 and starved["samples"] == 0
    assert starved["loss"] is None
    assert ok["oom_events"] == 0 and ok["steps"] == 2
    # only the healthy device contributes device copies; the edge trained only on its samples
    device_copies = [c for c in contributions if 1 in c.units]
    assert len(device_copies) == 1 and device_copies[0].samples[1] == 2 * BATCH
    edge = [c for c in contributions if 3 in c.units]
    assert edge[0].samples == {3: 2 * BATCH}
    aggregate(model, contributions)
    assert torch.equal(model[0][1].weight, device_copies[0].units[1]["1.weight"])
    assert not torch.equal(model[0][1].weight, before["0.1.weight"])


def test_on_device_manager_keeps_a_squeezed_device_within_budget(meter) -> None:
    """The same tight budget under the on-device manager: a plan that fits, no OOM, the meter's peak <= budget."""
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH, meter=meter, optimizer=(SGD.name, SGD.lr, SGD.momentum))
    need = device_memory(profile, 2, slots=0)
    tight = need.total - need.activations // 2
    hopeless = part(model, device(1), 1, 1, batches(BATCH, start=16), smart=True, meter=meter)  # nothing fits anywhere

    def measure(plan):
        return meter.step_peak(model[: plan.cut], SHAPE, BATCH, micro_batch=plan.micro_batch, segments=plan.segments,
                               optimizer=(SGD.name, SGD.lr, SGD.momentum), num_classes=CLASSES, to_edge=plan.cut < len(model))

    contributions, (r, h) = round_on_one_edge(
        model, [part(model, device(0), 2, tight, batches(BATCH, BATCH), smart=True, meter=meter), hopeless], data, profile,
        EDGE, SGD, measure=measure,
    )
    assert r["oom_events"] == 0 and r["steps"] == 2
    assert 0 < r["peak_measured_mb"] <= tight / 2**20 + 1e-3 and r["peak_predicted_mb"] <= tight / 2**20 + 1e-3
    assert h["steps"] == 0 and h["samples"] == 0  # it never trains over budget
    assert all(c.samples.get(1, 0) in (0, 2 * BATCH) for c in contributions)


def test_memory_guard_budget_below_the_weights_trains_nothing() -> None:
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    need = device_memory(profile, 1, slots=0)
    budget = need.static // 2
    contributions, (r,) = round_on_one_edge(
        model, [part(model, device(0), 1, budget, batches(BATCH, BATCH))], data, profile, EDGE, SGD
    )
    assert r["oom_events"] > 0  # reported ...
    assert r["steps"] == 0 and not contributions  # ... and nothing trained over budget


def test_oom_device_does_not_occupy_the_edge() -> None:
    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    need = device_memory(profile, 2, slots=0)
    parts = [
        part(model, device(0), 2, need.total - need.activations // 2, batches(BATCH)),  # OOM in its first forward
        part(model, device(1), 2, 10**9, batches(BATCH, start=8)),  # identical, arrives at the same moment
    ]
    _, (starved, ok) = round_on_one_edge(model, parts, data, profile, EDGE, SGD)
    assert starved["oom_events"] == 1 and starved["steps"] == 0 and ok["steps"] == 1
    assert ok["wait_s"] == 0.0


# --------------------------------------------------------------------------- strategies


def candidates(budgets: list[int], peaks=(10, 20, 30), times=(3.0, 1.0, 2.0)) -> list[Candidate]:
    return [Candidate(device(i, memory=b), b, tuple(peaks), tuple(times)) for i, b in enumerate(budgets)]


def test_fixed_cut_excludes_devices_that_do_not_fit() -> None:
    cands = candidates([5, 25, 35, 40, 30])
    plan = fedavg(3).configure_round(0, cands, 10, np.random.default_rng(0))
    assert plan.excluded == 2  # budgets 5 and 25 cannot hold the whole model (peak 30)
    assert sorted(a.device_id for a in plan.assignments) == [2, 3, 4]
    assert all(a.cut == 3 for a in plan.assignments)

    plan = splitfed(3).configure_round(0, cands, 10, np.random.default_rng(0))
    assert plan.excluded == 1 and all(a.cut == 1 for a in plan.assignments)  # middle of 3 units: 3 // 2
    assert FixedCut("splitfed", 2).configure_round(0, cands, 2, np.random.default_rng(0)).excluded == 1
    assert len(FixedCut("splitfed", 2).configure_round(0, cands, 2, np.random.default_rng(0)).assignments) == 2


def test_smartsplit_cuts_fit_budgets() -> None:
    cands = candidates([5, 15, 25, 35])
    plan = SmartSplit().configure_round(0, cands, 10, np.random.default_rng(0))
    assert plan.excluded == 1  # budget 5 fits no cut
    cuts = {a.device_id: a.cut for a in plan.assignments}
    assert cuts == {1: 1, 2: 2, 3: 2}  # fastest feasible: cut 2 (1.0 s) where it fits, else cut 1
    for a in plan.assignments:
        c = cands[a.device_id]
        assert c.peaks[a.cut - 1] <= c.budget


def test_selection_is_seeded() -> None:
    cands = candidates([100] * 12)
    for strategy in (SmartSplit(), fedavg(3)):
        a = strategy.configure_round(0, cands, 4, np.random.default_rng(42))
        b = strategy.configure_round(0, cands, 4, np.random.default_rng(42))
        assert a == b and len(a.assignments) == 4 and a.excluded == 0
        others = {strategy.configure_round(0, cands, 4, np.random.default_rng(s)).assignments for s in range(5)}
        assert len(others) > 1  # the choice does depend on the rng


# --------------------------------------------------------------------------- experiment


def tiny_config(seed: int = 3, budgets: str = "constant"):
    return build_config(
        {
            "name": "tiny",
            "seed": seed,
            "data": {"dataset": "synthetic", "synthetic_train": 120, "synthetic_test": 40},
            "model": {"name": "cnn", "width": 0.25},
            "fleet": {"devices": 6, "classes": {"phone-entry": 0.5, "wearable": 0.5},
                      "budgets": {"kind": budgets, "mean_gap_s": 0.5, "mean_hold_s": 1.0, "horizon_s": 200.0}},
            "training": {"rounds": 2, "devices_per_round": 2, "local_steps": 2, "batch_size": 8, "eval_batch_size": 64},
        }
    )


def run_all(config) -> tuple[list[dict], dict[str, torch.Tensor]]:
    exp = Experiment(config)
    records = [r.to_json() for r in exp.rounds()]
    for r in records:
        r.pop("wall_s")
    return records, exp.model.state_dict()


@pytest.mark.parametrize("budgets", ["constant", "foreground"])
def test_experiment_is_deterministic(budgets: str) -> None:
    a, wa = run_all(tiny_config(budgets=budgets))
    b, wb = run_all(tiny_config(budgets=budgets))
    assert len(a) == 2 and [r["round"] for r in a] == [1, 2]
    assert all(r["participants"] == 2 and len(r["cuts"]) == 2 and r["oom_events"] == 0 for r in a)
    assert [(r["accuracy"], r["loss"], r["cuts"]) for r in a] == [(r["accuracy"], r["loss"], r["cuts"]) for r in b]
    assert a == b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c, _ = run_all(tiny_config(seed=4, budgets=budgets))
    assert [r["loss"] for r in c] != [r["loss"] for r in a]


# --------------------------------------------------------------------------- budgets that change mid-round


def manager_for(model, flops_per_s: float = 1e6) -> OnDeviceManager:
    cache = ProfileCache()
    return OnDeviceManager(lambda m: cache.get("toy", model, SHAPE, m), BATCH, 0, flops_per_s, 2 * EDGE.latency_s)


def squeezed(model, dev, cut, trace, steps):
    return Spec(dev, cut, steps, trace, manager_for(model, dev.flops_per_s), replan=True, move_cut=True)


def test_mid_round_cut_move_keeps_training_without_losing_or_double_counting_samples() -> None:
    from smartsplit.fleet import BudgetTrace

    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    probe = manager_for(model)
    at_3 = probe.plan(3, 10**12).peak_bytes
    low, high = 0, at_3  # the least memory any plan at cut 3 needs (micro-batches and recompute included)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if probe.plan(3, mid) else (mid + 1, high)
    squeeze = low - 1  # just below it, after the first step: no plan fits at cut 3 any more
    assert probe.plan(3, squeeze) is None and probe.deepest_fitting_cut(3, squeeze) is not None
    dev = device(0)
    first_step = step_times(profile, 3, dev, EDGE).total
    trace = BudgetTrace((0.0, first_step * 1.5), (at_3, squeeze))
    steps = batches(BATCH, BATCH, BATCH, BATCH)
    contributions, (r,) = round_on_one_edge(model, [squeezed(model, dev, 3, trace, steps)], data, profile, EDGE, SGD)
    assert r["cut_moves"] >= 1 and r["final_cut"] < 3
    assert r["steps"] == 4 and r["samples"] == 4 * BATCH and r["oom_events"] == 0
    device_copy = [c for c in contributions if 1 in c.samples]
    assert len(device_copy) == 1 and device_copy[0].samples == {1: 4 * BATCH, 2: 4 * BATCH, 3: 4 * BATCH}
    # the units it gave up ran on the edge as its own copy: the shared edge copy trained none of them
    assert all(1 not in c.samples and 2 not in c.samples and 3 not in c.samples for c in contributions if c is not device_copy[0])


def role_holds(role: DeviceRole) -> int:
    """Bytes of every tensor the device role holds for its round (weights, buffers, gradients, optimizer state,
    the round's incoming weights), each storage once: a walk of what it holds, not a figure of the memory model."""
    r = role._round
    return held_bytes([r.units], [t for state in r.instructions.weights.values() for t in state.values()],
                      r.optimizer)


def test_a_device_squeezed_to_a_shallower_cut_holds_no_more_than_one_started_there() -> None:
    """A hand-off releases the units given away with their gradients and optimizer state (and the round's incoming
    weights are let go once loaded): mid-round, the squeezed device holds what a device started at its new cut
    holds, and at the round's end it rebuilds the units from what the edge trained."""
    model, data = chain(), dataset()
    momentum = OptimizerSpec("sgd", 0.1, 0.9, 1)  # with optimizer state to give away
    probe = manager_for(model)
    squeeze = probe.plan(1, 10**12).peak_bytes  # cut 1 fits; cuts 2 and 3 (the chain saves more there) do not
    assert probe.plan(3, squeeze) is None and probe.deepest_fitting_cut(3, squeeze).cut == 1
    trace = BudgetTrace((0.0, 1.0), (10**12, squeeze))

    def started(cut: int) -> tuple[DeviceRole, EdgeRole]:
        role = DeviceRole(device(0), data, np.arange(4 * BATCH), trace, manager_for(model), model, momentum, BATCH, 4,
                          None)
        edge = EdgeRole(0, model, momentum)
        edge.start_round(EdgeInstructions(0, unit_states(model, 1, 3), {0: cut}, "shared"))
        edge.open_session(0)
        role.start_round(RoundInstructions(0, 0, cut, unit_states(model, 1, cut), True, True, True, (0, 0, 0), 0.0))
        return role, edge

    squeezed_role, edge = started(3)
    squeezed_role.plan_step(0.0)
    assert round_mod.split_step(squeezed_role, edge, 0) is not None
    at_cut_3 = role_holds(squeezed_role)
    plan, handoff = squeezed_role.plan_step(2.0)  # the budget dropped: units 2..3 go to the edge
    assert plan.cut == 1 and sorted(handoff.weights) == [2, 3]
    edge.receive(handoff)
    assert round_mod.split_step(squeezed_role, edge, 1) is not None
    fresh, fresh_edge = started(1)
    fresh.plan_step(2.0)
    for step in (0, 1):
        assert round_mod.split_step(fresh, fresh_edge, step) is not None
    assert role_holds(squeezed_role) <= role_holds(fresh) < at_cut_3
    back, _, _ = edge.close_session(0)
    squeezed_role.take_back(back)  # the round's end: units 2..3 as the edge trained them
    result = squeezed_role.finish_round(SimulatedTimes())
    assert sorted(result.update.units) == [1, 2, 3]
    for index in (2, 3):
        for name, tensor in result.update.units[index].items():
            assert torch.equal(tensor, back.weights[index][name])


def test_device_pauses_while_nothing_fits_and_resumes() -> None:
    from smartsplit.fleet import BudgetTrace

    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    probe = manager_for(model)
    ample = probe.plan(2, 10**12).peak_bytes
    trace = BudgetTrace((0.0, 0.001, 50.0), (ample, 10, ample))  # nothing fits between 1 ms and 50 s
    contributions, (r,) = round_on_one_edge(
        model, [squeezed(model, device(0), 2, trace, batches(BATCH, BATCH))], data, profile, EDGE, SGD
    )
    assert r["pauses"] == 1 and r["paused_s"] > 40
    assert r["steps"] == 2 and r["oom_events"] == 0 and r["finish_s"] > 50
    # with a deadline before the budget returns, the device stops: its finished steps still count
    contributions, (r,) = round_on_one_edge(
        model, [squeezed(model, device(0), 2, trace, batches(BATCH, BATCH))], data, profile, EDGE, SGD, deadline_s=20.0
    )
    assert r["steps"] <= 1 and r["oom_events"] == 0 and r["finish_s"] < 20


def test_a_pause_ends_when_the_budget_returns_even_where_clock_sums_round_down() -> None:
    """The round's clock is relative (``start_s + now``); a pause that waits ``resume - start_s - now`` can land an
    ulp short of ``resume``, where the budget has not changed yet, and must not wait again (nor forever)."""
    import signal

    from smartsplit.fleet.clock import model_transfer_s

    model, data = chain(), dataset()
    profile = profile_chain(model, SHAPE, BATCH)
    probe = manager_for(model)
    ample = probe.plan(2, 10**12).peak_bytes
    dev = device(0)
    down = model_transfer_s(profile, 2, dev, EDGE)[0]  # the device plans its first step at `down` into the round
    draws = np.random.default_rng(0).uniform((0.0, 0.5), (5000.0, 60.0), (100_000, 2))
    start_s, resume = next((float(s), float(s + down + u)) for s, u in draws
                           if s + (down + ((s + down + u - s) - down)) < s + down + u)  # the relative clock falls short
    trace = BudgetTrace((0.0, start_s + down / 2, resume), (ample, 10, ample))  # nothing fits until `resume`
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("the pause never ended")))
    signal.alarm(60)
    try:
        _, (r,) = round_on_one_edge(model, [squeezed(model, dev, 2, trace, batches(BATCH, BATCH))], data, profile,
                                    EDGE, SGD, start_s=start_s)
    finally:
        signal.alarm(0)
    assert r["pauses"] == 1 and r["steps"] == 2 and r["paused_s"] == pytest.approx(resume - start_s - down)


def test_evaluating_every_other_round_trains_the_same_and_leaves_the_others_unevaluated():
    every = build_config({**tiny_config().model_dump(), "training": {**tiny_config().training.model_dump(), "rounds": 3}})
    sparse = build_config({**every.model_dump(), "training": {**every.training.model_dump(), "eval_every": 2}})
    dense, thin = run_all(every)[0], run_all(sparse)[0]
    assert [r["accuracy"] is None for r in thin] == [True, False, False]  # round 2, and always the last
    assert thin[0]["loss"] is None
    for a, b in zip(dense, thin):
        if b["accuracy"] is not None:
            assert (a["accuracy"], a["loss"]) == (b["accuracy"], b["loss"])
        assert a["devices"] == b["devices"]  # training did not change
    from smartsplit.records import RoundRecord
    from smartsplit.reports.summary import summarise

    summary = summarise([RoundRecord.from_json(r) for r in thin], name="x", strategy="s", seed=0, fleet_size=6,
                        target=0.0)
    assert summary.final_accuracy == thin[-1]["accuracy"] and summary.to_target["round"] == 2
