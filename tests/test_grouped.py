"""Devices stepping together as one computation (``kernels.grouped``, ``engine.grouping``) train what they train one
at a time, within floating-point rounding.

Tolerance: the grouped step computes the same sums in another order (batched convolutions and matrix products),
so every loss must agree to a relative 1e-4 (absolute 1e-6 near zero), one step's weights likewise, and the
global model's weights after two rounds (six local steps with momentum 0.9, where rounding differences grow) to
an absolute 1e-4 (checked with torch's own kernels, AVX2 and no vector extensions:
``ATEN_CPU_CAPABILITY=default`` gives differences up to 2e-5). One device at a time (``training.grouping:
never``) is bit for bit what the engine always did.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smartsplit.config import build_config
from smartsplit.engine.experiment import Experiment
from smartsplit.engine import grouping as grouping_module
from smartsplit.engine.grouping import MARGIN, Grouping
from smartsplit.errors import SmartSplitError
from smartsplit.kernels.grouped import Client, Stacked, step_together
from smartsplit.models.zoo import build_model
from smartsplit.runtime.embedded import run_experiment
from smartsplit.strategies.base import Assignment, RoundPlan
from smartsplit.strategies.fixed_cut import FixedCut
from smartsplit.strategies.options import EngineOptions

RTOL, ATOL = 1e-4, 1e-6
MODEL_ATOL = 1e-4  # the global model after rounds of steps

FEDAVG = {
    "name": "grouped", "seed": 3, "meter": False,
    "data": {"dataset": "synthetic", "synthetic_train": 400, "synthetic_test": 80},
    "model": {"name": "cnn", "width": 0.5},
    "fleet": {"devices": 8, "classes": {"phone-entry": 1.0}},
    "training": {"rounds": 2, "devices_per_round": 6, "local_steps": 3, "batch_size": 16, "momentum": 0.9},
    "strategy": {"name": "fedavg"},
}
# budgets that drop below the whole model's peak mid-round: fedavg-ckpt's devices re-plan (micro-batches,
# recomputation), so their steps stop waiting and go on alone
SQUEEZED = ["strategy.name=fedavg-ckpt", "fleet.budgets.kind=foreground",
            "fleet.budgets.mean_gap_s=0.02", "fleet.budgets.mean_hold_s=0.3", "fleet.budgets.max_take=0.9",
            "fleet.budgets.floor=0.01", "fleet.budgets.horizon_s=3000"]


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= ATOL + RTOL * abs(b)


def run(tmp_path: Path, grouping: str, *overrides: str, strategy=None) -> tuple[list[dict], dict, dict]:
    config = build_config({**FEDAVG, "output_dir": str(tmp_path)}, [*overrides, f"training.grouping={grouping}",
                                                                   f"name=g-{grouping}"])
    run_experiment(config, progress=False, overwrite=True, strategy=strategy)
    folder = tmp_path / f"g-{grouping}"
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return records, torch.load(folder / "model.pt"), json.loads((folder / "summary.json").read_text())


def assert_alike(a: list[dict], b: list[dict], exact: bool = False) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert [d["device"] for d in ra["devices"]] == [d["device"] for d in rb["devices"]]
        assert [d["steps"] for d in ra["devices"]] == [d["steps"] for d in rb["devices"]]
        assert ra["latency_s"] == rb["latency_s"]  # the simulated clock does not depend on the arithmetic
        for da, db in zip(ra["devices"], rb["devices"]):
            assert (da["cut"], da["bytes_up"], da["bytes_down"]) == (db["cut"], db["bytes_up"], db["bytes_down"])
            assert (da["loss_rms"] == db["loss_rms"]) if exact else close(da["loss_rms"], db["loss_rms"]), (da, db)
        assert (ra["loss"] == rb["loss"]) if exact else close(ra["loss"], rb["loss"])


def test_clients_stepped_together_equal_each_stepped_alone():
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=0.5, input_size=28)
    clients, steps, batch = 4, 3, 8
    xs, ys = torch.randn(steps, clients, batch, 1, 28, 28), torch.randint(0, 10, (steps, clients, batch))
    alone = [copy.deepcopy(model) for _ in range(clients)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in alone]
    together = [Client(copy.deepcopy(model)) for _ in range(clients)]
    for s in range(steps):
        want = []
        for m, o, x, y in zip(alone, optimizers, xs[s], ys[s]):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y, reduction="sum") / len(y)
            loss.backward()
            o.step()
            want.append(loss.item())
        got = step_together(together, xs[s], ys[s], 0.05, 0.9)
        assert all(close(g, w) for g, w in zip(got, want)), (got, want)
    for m, o, c in zip(alone, optimizers, together):
        for (name, p), q in zip(m.named_parameters(), c.units.parameters()):
            torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(c.momentum[name], o.state[p]["momentum_buffer"], rtol=RTOL, atol=ATOL)


def test_a_fedavg_run_grouped_trains_what_it_trains_one_device_at_a_time(tmp_path):
    alone, alone_model, _ = run(tmp_path, "never")
    together, together_model, summary = run(tmp_path, "always")
    assert_alike(together, alone)
    for name in alone_model:
        torch.testing.assert_close(together_model[name], alone_model[name], rtol=0, atol=MODEL_ATOL)
    assert summary["grouping"]["mode"] == "always"


def test_devices_whose_budgets_squeeze_them_mid_round_go_on_alone(tmp_path, monkeypatch):
    """fedavg-ckpt under swinging budgets: some steps need micro-batches or recomputation, so those devices run
    their waiting steps alone there and then (``catch_up``); the run still equals one device at a time."""
    from smartsplit.roles.device import DeviceRole

    caught_up, grouped = [], []
    catch_up, finish = DeviceRole.catch_up, DeviceRole.finish_deferred
    monkeypatch.setattr(DeviceRole, "catch_up",
                        lambda self: (caught_up.append(self._state.deferred) if self._state.deferred else None, catch_up(self))[1])
    monkeypatch.setattr(DeviceRole, "finish_deferred",
                        lambda self, client, losses: (grouped.append(len(losses)), finish(self, client, losses))[1])
    alone, _, _ = run(tmp_path, "never", *SQUEEZED)
    assert not caught_up and not grouped  # never: nothing waits
    together_records, _, _ = run(tmp_path, "always", *SQUEEZED)
    assert_alike(together_records, alone)
    assert caught_up and grouped, "the squeezed fleet should exercise both the fallback and grouping"
    assert sum(r["oom_events"] or 0 for r in alone) == sum(r["oom_events"] or 0 for r in together_records)


def test_devices_that_drop_out_mid_round_count_the_steps_they_finished(tmp_path):
    overrides = ["fleet.availability.kind=on_off", "fleet.availability.mean_on_s=3",
                 "fleet.availability.mean_off_s=1"]
    alone, _, _ = run(tmp_path, "never", *overrides)
    together, _, _ = run(tmp_path, "always", *overrides)
    assert_alike(together, alone)
    assert sum(r["dropouts"] or 0 for r in alone) > 0, "the churn should make devices drop out mid-round"


class MixedCuts(FixedCut):
    """SplitFed-v1 (a server-side copy per device) whose devices cut at 1..L by their id: mixed cuts."""

    def __init__(self, num_units: int) -> None:
        super().__init__("mixed-cuts", num_units, execution=EngineOptions(edge_copies="per-device"))

    def configure_round(self, rnd, candidates, k, rng) -> RoundPlan:
        plan = super().configure_round(rnd, candidates, k, rng)
        return RoundPlan(tuple(Assignment(a.device_id, 1 + a.device_id % self.cut) for a in plan.assignments),
                         plan.excluded)


def count_grouped(monkeypatch) -> list[tuple[int, int]]:
    """(cut, waiting steps) of every device whose waiting steps ran grouped, from now on."""
    from smartsplit.roles.device import DeviceRole

    grouped, finish = [], DeviceRole.finish_deferred
    monkeypatch.setattr(DeviceRole, "finish_deferred", lambda self, client, losses: (
        grouped.append((self.cut, len(losses))), finish(self, client, losses))[1])
    return grouped


def test_split_devices_with_their_own_server_side_copies_group_across_mixed_cuts(tmp_path, monkeypatch):
    """With a server-side copy per device, a split device's step is the whole model's step, its units held by
    the device and by its copy at the edge: devices of mixed cuts step together, and the run equals one device
    at a time (the same cuts, bytes on the links and clock; losses and the model within rounding)."""
    num_units = len(build_model("cnn", in_channels=1, num_classes=10, width=0.5, input_size=28))
    from smartsplit.roles.device import DeviceRole

    grouped, cut_of, stacks = count_grouped(monkeypatch), {}, []
    client = DeviceRole.deferred_client
    monkeypatch.setattr(DeviceRole, "deferred_client", lambda self: cut_of.setdefault(id(c := client(self)), self.cut) and c)
    monkeypatch.setattr(grouping_module, "Stacked", lambda clients, device: (
        stacks.append(sorted(cut_of[id(c)] for c in clients)), Stacked(clients, device))[1])
    alone, alone_model, _ = run(tmp_path, "never", strategy=MixedCuts(num_units))
    assert not grouped
    together, together_model, _ = run(tmp_path, "always", strategy=MixedCuts(num_units))
    assert_alike(together, alone)
    for name in alone_model:
        torch.testing.assert_close(together_model[name], alone_model[name], rtol=0, atol=MODEL_ATOL)
    cuts = {cut for cut, _ in grouped}
    assert len(cuts) >= 3 and any(cut < num_units for cut in cuts), cuts
    assert any(len(set(cuts)) > 1 for cuts in stacks), stacks  # devices of different cuts in one computation
    assert sum(d["bytes_up"] for r in alone for d in r["devices"] if d["cut"] < num_units) > 0


def test_split_devices_squeezed_mid_round_catch_up_through_their_own_copy(tmp_path, monkeypatch):
    """SplitFed-v1 with checkpointing under swinging budgets: devices whose plans change mid-round run their
    waiting steps one at a time through their own server-side copy (``catch_up``), then go on alone."""
    from smartsplit.roles.device import DeviceRole

    caught_up, catch_up = [], DeviceRole.catch_up
    monkeypatch.setattr(DeviceRole, "catch_up",
                        lambda self: (caught_up.append(self._state.deferred) if self._state.deferred else None, catch_up(self))[1])
    squeezed = ["strategy.name=splitfed", *SQUEEZED[1:]]
    splitfed = FixedCut("splitfed-v1", 2, checkpointing=True, execution=EngineOptions(edge_copies="per-device"))
    alone, _, _ = run(tmp_path, "never", *squeezed, strategy=splitfed)
    together, _, _ = run(tmp_path, "always", *squeezed, strategy=splitfed)
    assert_alike(together, alone)
    assert caught_up, "the squeezed fleet should make split devices stop waiting mid-round"


@pytest.mark.parametrize("strategy", ["splitfed-v2", "smartsplit"])
def test_split_devices_sharing_a_server_side_copy_are_never_grouped(tmp_path, strategy, monkeypatch):
    """A shared server-side copy trains on its devices' steps in simulated arrival order: their steps cannot
    wait, and a run with grouping on is bit for bit the run without."""
    grouped = count_grouped(monkeypatch)
    alone, _, _ = run(tmp_path, "never", f"strategy.name={strategy}")
    together, _, _ = run(tmp_path, "always", f"strategy.name={strategy}")
    assert_alike(together, alone, exact=True)
    assert not grouped


def test_auto_measures_once_and_groups_only_where_together_is_clearly_faster(tmp_path):
    config = build_config({**FEDAVG, "output_dir": str(tmp_path)}, [])
    x = Experiment(config)
    grouping = Grouping("auto", "cpu", x.architecture, x.input_shape, x.train.num_classes)
    chosen = grouping.pays(16, 3)
    choice = grouping.record()["choices"][0]
    assert choice["batch"] == 16 and choice["clients"] == 4  # timed for a power of two of clients
    assert choice["one_at_a_time_s"] > 0 and choice["together_s"] > 0
    assert chosen == (choice["one_at_a_time_s"] >= MARGIN * choice["together_s"]) == choice["grouped"]
    again = Grouping("auto", "cpu", x.architecture, x.input_shape, x.train.num_classes)
    assert again.pays(16, 4) == chosen and again.record()["choices"][0] == choice  # from the cache: decided once
    x.close()


def test_cuda_without_a_gpu_is_refused_in_one_sentence(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal is for machines without one")
    config = build_config({**FEDAVG, "output_dir": str(tmp_path)}, ["device=cuda"])
    with pytest.raises(SmartSplitError, match="device: cuda, but torch sees no CUDA GPU"):
        Experiment(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("split", [False, True], ids=["fedavg", "mixed-cuts"])
def test_grouped_steps_on_the_gpu_equal_the_cpu(tmp_path, split):
    num_units = len(build_model("cnn", in_channels=1, num_classes=10, width=0.5, input_size=28))
    strategy = (lambda: MixedCuts(num_units)) if split else (lambda: None)
    cpu, cpu_model, _ = run(tmp_path, "always", strategy=strategy())
    gpu, gpu_model, summary = run(tmp_path / "cuda", "always", "device=cuda", strategy=strategy())
    assert summary["grouping"]["device"] == "cuda"
    assert_alike(gpu, cpu)
    for name in cpu_model:
        torch.testing.assert_close(gpu_model[name], cpu_model[name], rtol=0, atol=MODEL_ATOL)
