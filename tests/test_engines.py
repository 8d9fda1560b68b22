"""The parallel and Ray engines train what the sequential engine trains, bit for bit.

A round splits into parts that share nothing (an edge server with the devices that train through it; devices
that train their whole model and may not move their cut); each part trains in a worker (a local process or a
Ray actor) and the parts assemble in device-id order, so every metric equals the sequential engine's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smartsplit.api import compare
from smartsplit.config import build_config
from smartsplit.engine.experiment import Experiment
from smartsplit.runtime.workers import split_round
from smartsplit.errors import SmartSplitError
from smartsplit.runtime.embedded import run_experiment

TINY = {
    "name": "tiny", "seed": 5, "meter": False,
    "data": {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 60},
    "model": {"name": "cnn", "width": 1.0},
    "fleet": {"devices": 6, "classes": {"mcu-psram": 0.5, "wearable": 0.5}},
    "training": {"rounds": 2, "devices_per_round": 5, "local_steps": 3, "batch_size": 16,
                 # the engines agree bit for bit where no steps are grouped (engine.grouping): pinned,
                 # whatever this machine's timing of grouped steps would choose
                 "grouping": "never"},
    "strategy": {"name": "smartsplit"},
    "edge": {"servers": 2},
}
ROOMY = ["fleet.classes={phone-entry: 1.0}"]  # every device fits the whole model
# budgets that swing hard mid-round: re-plans, cut moves (units handed to the edge), pauses
SQUEEZED = ["fleet.budgets.kind=foreground", "fleet.budgets.mean_gap_s=0.5", "fleet.budgets.mean_hold_s=1",
            "fleet.budgets.max_take=0.95", "fleet.budgets.floor=0.01", "fleet.budgets.horizon_s=3000"]


def config(tmp_path: Path, *overrides: str):
    return build_config({**TINY, "output_dir": str(tmp_path / "runs")}, list(overrides))


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("wall_s")
    return records


def sequential(tmp_path: Path, *overrides: str) -> list[dict]:
    run_experiment(config(tmp_path, "name=sequential", *overrides), progress=False)
    return metrics(tmp_path / "runs" / "sequential")


def first_round(tmp_path: Path, *overrides: str):
    x = Experiment(config(tmp_path, *overrides))
    plan = x.central.plan_round(0, x.candidates(), x.config.training.devices_per_round)
    instructions, _ = x.central.instructions(0, plan, 0.0)
    return x, instructions


def test_a_round_splits_into_parts_that_share_nothing(tmp_path):
    x, instructions = first_round(tmp_path, "strategy.name=fedavg")  # every device trains alone
    parts = split_round(x, instructions, workers=2)
    assert len(parts) == 2 and sorted(i.device_id for p in parts for i in p.instructions) == sorted(i.device_id for i in instructions)
    assert abs(parts[0].load - parts[1].load) <= max(x.local_steps)  # balanced by local steps

    x, instructions = first_round(tmp_path, "strategy.name=splitfed")  # devices train through their edge
    parts = split_round(x, instructions, workers=4)
    assert len(parts) == 2  # one per edge server, never more: an edge's devices share its queue and copy
    for part in parts:
        assert len(part.edges) == 1 and all(x.central.edge_of(i.device_id) == part.edges[0] for i in part.instructions)
    assert len(split_round(x, instructions, workers=1)) == 1

    x, instructions = first_round(tmp_path, "strategy.name=splitfed-v2")  # each device waits for the previous one
    assert len(split_round(x, instructions, workers=4)) == 1


@pytest.mark.parametrize("strategy,overrides", [
    ("fedavg", ROOMY),
    ("smartsplit", SQUEEZED),
    ("splitfed-v1", ROOMY + ["fleet.availability.kind=on_off", "fleet.availability.mean_on_s=2", "fleet.availability.mean_off_s=2"]),
])
def test_the_parallel_engine_gives_the_sequential_metrics(tmp_path, strategy, overrides):
    want = sequential(tmp_path, f"strategy.name={strategy}", *overrides)
    run_experiment(config(tmp_path, "name=parallel", "engine=parallel", "workers=2", f"strategy.name={strategy}",
                          *overrides), progress=False)
    got = metrics(tmp_path / "runs" / "parallel")
    assert got == want
    assert all(r["participants"] for r in got)
    if strategy == "smartsplit":  # the squeeze made devices re-plan mid-round
        assert sum(r["cut_moves"] + r["replans"] for r in got) > 0
    if strategy == "splitfed-v1":  # devices went offline mid-round
        assert sum(r["dropouts"] for r in got) > 0


def test_the_parallel_engine_trains_a_part_here_with_workers_started_before_torch_is_imported(tmp_path):
    """``smartsplit run`` starts the parallel engine's workers (``WorkerPool``) once it has read the config and
    checked the run folder, before this process imports torch, so that they start while it does; this process
    trains one part of each round itself, so two workers are this process and one spawned."""
    from smartsplit.runtime.pool import WorkerPool
    from smartsplit.runtime.workers import ProcessRounds

    code = ("import sys, smartsplit.cli, smartsplit.config, smartsplit.runtime.folder, smartsplit.runtime.pool; "
            "print(sorted({'torch', 'numpy'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr

    c = config(tmp_path, "engine=parallel", "workers=2", "strategy.name=fedavg", *ROOMY)
    pool = WorkerPool.for_run(c)
    assert pool.processes == 1
    with pytest.raises(ValueError, match="another config"):
        ProcessRounds(config(tmp_path, "engine=parallel", "workers=2", *ROOMY), pool=pool)
    engine = ProcessRounds(c, pool=pool)
    try:
        x = Experiment(c, executor=engine)
        record = x.run_round(0)
        trained_here = set(x._device_roles)  # a device's role exists in this process once it trained here
        assert record.participants == 5 and 0 < len(trained_here) < 5
    finally:
        engine.close()
    assert WorkerPool.for_run(config(tmp_path, "engine=parallel", "workers=1")) is None  # nothing to spawn
    assert WorkerPool.for_run(config(tmp_path)) is None


def test_compare_gives_a_run_that_trains_apart_the_cores_left_idle(tmp_path):
    """Three runs on two cores: the two split runs start first, each in its own process; FedAvg, whose devices
    train apart, starts last with the parallel engine on both cores. Every run's metrics are its sequential
    ones."""
    base = config(tmp_path, *ROOMY)
    summaries = compare(base, ["fedavg", "splitfed", "smartsplit"], workers=2, report=False)
    engines = {s.strategy: yaml.safe_load((Path(s.run_dir) / "config.yaml").read_text())["engine"] for s in summaries}
    assert engines == {"fedavg": "parallel", "splitfed": "sequential", "smartsplit": "sequential"}
    for summary in summaries:
        want = sequential(tmp_path / summary.strategy, f"strategy.name={summary.strategy}", *ROOMY)
        assert metrics(Path(summary.run_dir)) == want


def test_run_engine_flags_and_resuming_on_another_engine(tmp_path):
    want = sequential(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs"), "training": {**TINY["training"], "rounds": 1}}))
    run_dir = tmp_path / "runs" / "flags"
    cli = [sys.executable, "-m", "smartsplit.cli", "run"]
    done = subprocess.run([*cli, str(path), "--out", str(run_dir), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*cli, "--resume", str(run_dir), "--set", "training.rounds=2", "--engine", "parallel",
                           "--workers", "2", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert metrics(run_dir) == want
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["engine"] == "parallel"


def test_an_unpicklable_strategy_is_refused_with_a_hint(tmp_path):
    from smartsplit.strategies import make_strategy

    c = config(tmp_path, "engine=parallel", "workers=2")
    strategy = make_strategy(c.strategy, 5, 0)
    strategy.hook = lambda: None  # a lambda cannot travel to a spawned worker
    with pytest.raises(SmartSplitError, match="cannot be sent to worker processes"):
        run_experiment(c, progress=False, strategy=strategy)


# ---- Ray: a local Ray with 2 CPUs, started once for these tests

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray engine needs Ray: pip install 'smartsplit[ray]'")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"a local Ray with 2 CPUs could not start here: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("strategy,overrides", [("smartsplit", SQUEEZED), ("fedavg", ROOMY)])
def test_the_ray_engine_gives_the_sequential_metrics(tmp_path, local_ray, strategy, overrides):
    want = sequential(tmp_path, f"strategy.name={strategy}", *overrides)
    run_experiment(config(tmp_path, "name=ray", "engine=ray", f"strategy.name={strategy}", *overrides), progress=False)
    assert metrics(tmp_path / "runs" / "ray") == want
    assert local_ray.is_initialized()  # the engine joined the running Ray and left it running


def test_compare_runs_each_strategy_as_a_ray_task(tmp_path, local_ray):
    base = config(tmp_path, "engine=ray")
    summaries = compare(base, ["fedavg", "splitfed"], report=False)
    for summary, strategy in zip(summaries, ["fedavg", "splitfed"]):
        assert summary.strategy == strategy
        assert metrics(Path(summary.run_dir)) == sequential(tmp_path / strategy, f"strategy.name={strategy}")


def test_a_call_to_a_worker_crosses_packed_with_every_tensor_as_it_was():
    """``runtime.packing``: one buffer for a call's tensors; each comes back equal, with its dtype and strides
    (channels-last stays so), in storage of its own; a tensor twice in a message comes back once; a tensor that
    needs its graph, a parameter, or a strided slice crosses as plain pickling sends it."""
    import pickle

    from smartsplit.runtime.packing import ALIGN, pack, unpack

    shared = torch.arange(10)
    value = {
        "weights": {1: {"w": torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)}},
        "labels": shared, "again": shared, "flags": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3), "slice": torch.randn(6, 6)[:, ::2], "graph": torch.ones(2, requires_grad=True),
        "param": torch.nn.Parameter(torch.ones(3)), "plain": [1, "two", 3.0],
    }
    packed = pack(value)
    assert len(packed.tensors) == 6 and packed.buffer.numel() % ALIGN == 0  # labels once; not slice, graph, param
    back = unpack(pickle.loads(pickle.dumps(packed)))
    for key in ("labels", "flags", "scalar", "empty", "slice", "graph", "param"):
        assert torch.equal(back[key].detach(), value[key].detach()) and back[key].dtype == value[key].dtype, key
        assert back[key].stride() == value[key].stride(), key
    w, w0 = back["weights"][1]["w"], value["weights"][1]["w"]
    assert torch.equal(w, w0) and w.stride() == w0.stride() and w.is_contiguous(memory_format=torch.channels_last)
    assert back["labels"] is back["again"] and back["plain"] == value["plain"]
    assert back["graph"].requires_grad and isinstance(back["param"], torch.nn.Parameter)
    storages = {t.untyped_storage().data_ptr() for t in (w, back["labels"], back["flags"], back["scalar"])}
    assert len(storages) == 4 and w.untyped_storage().nbytes() == w.numel() * w.element_size()
