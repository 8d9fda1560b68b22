"""Every strategy and ablation runs end to end; hierarchy, edge copies and edge order behave as documented."""

from __future__ import annotations

import copy

import pytest
import torch

from smartsplit.config import build_config
from smartsplit.kernels.aggregate import aggregate, merge, unit_states
from smartsplit.engine.experiment import Experiment
from smartsplit.messages import Update
from smartsplit.strategies import STRATEGIES

TINY = {
    "data": {"dataset": "synthetic", "synthetic_shape": [1, 28, 28], "synthetic_train": 240, "synthetic_test": 60},
    "model": {"name": "cnn", "width": 0.25},
    "fleet": {"devices": 6, "classes": {"mcu-psram": 0.5, "wearable": 0.5},
              "budgets": {"kind": "foreground", "mean_gap_s": 5, "mean_hold_s": 5, "horizon_s": 500}},
    "training": {"rounds": 2, "devices_per_round": 3, "local_steps": 2, "batch_size": 8},
}




@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_end_to_end(name):
    experiment = Experiment(build_config(TINY, [f"strategy.name={name}"]))
    records = list(experiment.rounds())
    assert [r.round for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r.accuracy <= 1.0
        assert r.participants + 0 <= 3
        assert all(1 <= c <= experiment.num_units for c in r.cuts)
        assert r.decision["strategy"] == experiment.strategy.name
    if name in ("smartsplit", "smartsplit-no-selection", "smartsplit-no-finetuning", "fedavg-ckpt"):
        assert sum(r.oom_events for r in records) == 0  # the on-device manager never crosses a budget


def test_hierarchical_equals_flat_with_one_edge():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    copies = []
    for i in range(3):
        trained = copy.deepcopy(base)
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(torch.randn_like(p))
        copies.append(trained)
    contributions = [
        Update(unit_states(copies[0], 1, 1), {1: 10}),
        Update(unit_states(copies[1], 1, 2), {1: 30, 2: 30}),
        Update(unit_states(copies[2], 2, 3), {2: 10, 3: 40}),  # the edge copy
    ]
    flat, hierarchical = copy.deepcopy(base), copy.deepcopy(base)
    aggregate(flat, contributions)
    aggregate(hierarchical, [merge(contributions)])
    for a, b in zip(flat.parameters(), hierarchical.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # two edges: merging within each edge, then across, weighs every sample alike
    two_level = copy.deepcopy(base)
    aggregate(two_level, [merge(contributions[:1]), merge(contributions[1:])])
    for a, b in zip(flat.parameters(), two_level.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_two_edge_servers_share_the_work():
    config = build_config(TINY, ["strategy.name=splitfed", "edge.servers=2", "edge.gflops=[1000, 0.001]",
                                 "fleet.budgets.kind=constant", "training.devices_per_round=6"])
    experiment = Experiment(config)
    record = experiment.run_round(0)
    by_edge = {0: [], 1: []}
    for r in record.devices:
        by_edge[r.device % 2].append(r.finish_s)
    assert by_edge[0] and by_edge[1]
    assert min(by_edge[1]) > max(by_edge[0])  # the slow edge (1 MFLOP/s) holds its own devices back only


def test_sequential_edge_order_is_slower_than_interleaved():
    common = ["fleet.budgets.kind=constant", "training.devices_per_round=4", "fleet.classes={phone-entry: 1.0}"]
    v1 = Experiment(build_config(TINY, ["strategy.name=splitfed-v1", *common])).run_round(0)
    v2 = Experiment(build_config(TINY, ["strategy.name=splitfed-v2", *common])).run_round(0)
    assert v2.latency_s > 2 * v1.latency_s  # one device after another: latencies add up


def test_your_own_model_trains_split(monkeypatch):
    """A user's non-Sequential model, named by import path, is cut into units and trained split."""
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    config = build_config(TINY, ["model.name=user_models:tiny_residual", "strategy.name=smartsplit"])
    experiment = Experiment(config)
    assert experiment.num_units >= 3
    a = list(Experiment(config).rounds())
    b = list(experiment.rounds())
    assert [r.accuracy for r in a] == [r.accuracy for r in b]  # seeded: the same model twice
    assert all(r.participants > 0 for r in b)


def test_bad_user_model_is_a_clear_error():
    from smartsplit.errors import SmartSplitError

    with pytest.raises(SmartSplitError, match="cannot import"):
        Experiment(build_config(TINY, ["model.name=no_such_module:factory"]))


class _Lying:
    """A strategy of your own whose plans break the interface's promises, one way per instance."""

    @staticmethod
    def make(fault: str):
        from smartsplit.strategies import Assignment, RoundPlan, Strategy

        class Lying(Strategy):
            name = f"lying-{fault}"

            def configure_round(self, rnd, candidates, k, rng):
                first = candidates[0].device.id
                if fault == "list":
                    return [Assignment(first, 1)]
                assignments = {
                    "absent": (Assignment(10_000, 1),),
                    "deep": (Assignment(first, 99),),
                    "twice": (Assignment(first, 1), Assignment(first, 1)),
                    "notes": (Assignment(first, 1),),
                }[fault]
                return RoundPlan(assignments, 0, ["not", "a", "mapping"] if fault == "notes" else {})

        return Lying()


@pytest.mark.parametrize("fault, message", [
    ("list", "returned list, not a RoundPlan"),
    ("absent", "assigned device 10000, which is not among this round's"),
    ("deep", "gave device 0 cut 99; cuts are 1..5"),
    ("twice", "assigned device 0 twice"),
    ("notes", "RoundPlan.notes must be a dict"),
])
def test_a_strategy_whose_plan_breaks_the_interface_is_refused_in_one_sentence(fault: str, message: str) -> None:
    from smartsplit.errors import SmartSplitError

    experiment = Experiment(build_config(copy.deepcopy(TINY)), strategy=_Lying.make(fault))
    with pytest.raises(SmartSplitError, match=f"strategy 'lying-{fault}': configure_round.*{message}"):
        experiment.run_round(0)


def test_a_strategy_that_is_not_a_strategy_and_overrides_that_are_a_string_are_refused() -> None:
    from smartsplit.config import load_config
    from smartsplit.errors import SmartSplitError

    class Duck:
        name = "duck"

    with pytest.raises(SmartSplitError, match="Duck is not a smartsplit.Strategy"):
        Experiment(build_config(copy.deepcopy(TINY)), strategy=Duck())
    with pytest.raises(SmartSplitError, match=r"load_config\(overrides=...\): expected a list of str, got str"):
        load_config("configs/fmnist.yaml", "training.rounds=3")
    assert load_config("configs/fmnist.yaml", ("training.rounds=3",)).training.rounds == 3  # any sequence of them


@pytest.mark.parametrize("call, message", [
    (lambda api, cfg: api.run(3), r"run\(config=...\): expected Config or str or Path, got int 3"),
    (lambda api, cfg: api.run(cfg, overrides="training.rounds=1"), r"run\(overrides=...\): expected a list of str"),
    (lambda api, cfg: api.run(cfg, strategy="fedavg"), r"run\(strategy=...\): expected Strategy or None, got str"),
    (lambda api, cfg: api.run(cfg, run_dir=7), r"run\(run_dir=...\): expected str or Path or None, got int"),
    (lambda api, cfg: api.run(cfg, resume="yes"), r"run\(resume=...\): expected bool, got str"),
    (lambda api, cfg: api.compare(cfg, "fedavg"), r"compare\(strategies=...\): expected a list of str, got str"),
    (lambda api, cfg: api.compare(cfg, ["fedavg"], seeds=[1.5]), r"compare\(seeds=...\): expected a list of int"),
    (lambda api, cfg: api.compare(cfg, ["fedavg"], workers="2"), r"compare\(workers=...\): expected int or None"),
    (lambda api, cfg: api.load_config(3), r"load_config\(path=...\): expected str or Path, got int"),
    (lambda api, cfg: api.Experiment("configs/fmnist.yaml"), r"Experiment\(config=...\): expected Config, got str"),
])
def test_the_public_api_names_an_argument_of_the_wrong_type(call, message) -> None:
    """Every public function checks its arguments' types before it does anything: one clear error naming the
    function, the argument and what it takes, never a traceback from deep inside."""
    import smartsplit
    from smartsplit.errors import SmartSplitError

    with pytest.raises(SmartSplitError, match=message):
        call(smartsplit, build_config(copy.deepcopy(TINY)))


def test_learned_profiles_move_each_devices_predicted_round_toward_what_it_measured() -> None:
    """fleet.profiles: learned. Here the clock model's forecast overestimates a device whose last local batch is
    short; the reports (the simulator's times, as a device's would be measured ones) pull the prediction toward them
    round by round, while the catalog's stays where it was. The estimates are part of the resumable state."""
    from smartsplit.engine.learned import LearnedProfiles
    from smartsplit.records import DeviceReport

    from test_config_cli import TINY as SHORT_LAST_BATCH  # 15 examples a device, batches of 8: the second is short

    def errors(profiles: str) -> tuple[list[float], Experiment]:
        raw = copy.deepcopy(SHORT_LAST_BATCH)
        raw["fleet"] = {**raw["fleet"], "profiles": profiles, "devices": 6}
        raw["training"] = {**raw["training"], "rounds": 4, "devices_per_round": 3}
        experiment = Experiment(build_config(raw))
        out = []
        for record in experiment.rounds():
            finish = {d.device: d.finish_s for d in record.devices}
            out.append(max(abs(a["predicted_round_s"] / finish[a["device"]] - 1) for a in record.decision["assignments"]))
        return out, experiment

    catalog, _ = errors("catalog")
    learned, experiment = errors("learned")
    assert catalog[0] == learned[0] > 0.05 and catalog[-1] == catalog[0]  # the same first plan, the same bias
    assert learned[1] == learned[0] and learned[-1] < learned[0] / 2  # from each device's second round on
    assert experiment.state_dict(4)["learned"]["factors"] == {str(k): v for k, v in experiment.learned.factors.items()}

    slow = LearnedProfiles(started={7, 8})  # past their first rounds (start-up)
    fields = dict(device_class="c", cut=2, final_cut=2, budget_mb=1.0, peak_predicted_mb=1.0, peak_measured_mb=None,
                  held_mb=None, micro_batches=[8], oom_events=0, replans=0, cut_moves=0, pauses=0, dropped_out=False,
                  steps=3, samples=24, loss=1.0, loss_rms=1.0, compute_s=0.0, recompute_s=0.0, comm_s=0.0, wait_s=1.0,
                  paused_s=0.0, bytes_up=0, bytes_down=0)
    slow.learn([DeviceReport(device=7, finish_s=5.0, **fields)], {7: 2.0})  # 2 s predicted, 4 s its own
    assert slow.factors[7] == pytest.approx(0.5 * 1.0 + 0.5 * 2.0)
    from smartsplit.fleet import Device
    seen = slow.device(Device(7, "c", 2**20, 3e9, 1e6, 2e6))
    assert (seen.flops_per_s, seen.uplink_bytes_per_s, seen.downlink_bytes_per_s) == pytest.approx((2e9, 1e6 / 1.5, 2e6 / 1.5))
    slow.learn([DeviceReport(device=8, finish_s=5.0, **{**fields, "dropped_out": True})], {8: 2.0})
    assert 8 not in slow.factors  # a partial round says nothing about the device's speed
    slow.learn([DeviceReport(device=9, finish_s=5.0, **fields)], {9: 2.0})
    assert 9 not in slow.factors and 9 in slow.started  # a first round is start-up: the next one counts
