"""Training and evaluation throughput of one FedAvg workload: SmartSplit (its CLI, ``smartsplit run``) against a
plain PyTorch loop that trains the same samples (the ceiling), at 1 and 2 torch threads, and optionally Flower 1.42's
simulation engine, each in a fresh process, measured on this machine in one invocation.

The workload (benchmarks/throughput.yaml): Fashion-MNIST, the CNN ``cnn`` below as a user model (``model.name:
throughput:cnn``), 100 devices with a Dirichlet(0.5) label partition, 10 a round, 10 rounds of 1 local epoch at
batch 32, SGD lr 0.05 without momentum, the global model tested on the whole 10k test set after every round, every
device an rpi4 with a constant 2 GiB budget (the whole model fits, so fedavg trains it whole, nothing recomputed).

For each run it prints the samples trained, the training samples/s over the rounds (samples / the rounds' time
less their evaluations), the evaluation samples/s (test examples evaluated / evaluation time), the samples/s over
the whole process (samples / wall time from launch to exit, measured here) and the process's peak RSS (wait4's
ru_maxrss: the largest single process of its tree) with the peak summed PSS of its process tree (sampled every
1 s), then the ratios to the ceiling. SmartSplit's ``metrics.jsonl`` gives each round's ``wall_s``, samples and
steps but does not separate evaluation from training, so the SmartSplit process is ``smartsplit.cli.main`` with
timers wrapped around the engine's calls (evaluation, planning, device training, aggregation: the breakdown line);
its round times are the metrics' ``wall_s``. The ceiling trains exactly SmartSplit's batches (each round's
devices' batch sizes, from the metrics) on the same data, normalised the same way, with the same 10 evaluations:
client by client (one device's batch per step, as every federated engine trains), and as one large batch (each
local step's batches of all the round's devices in one step: the arithmetic ceiling, what the same samples
cost on this machine when nothing keeps the clients apart), and with ``--ceiling-processes N`` client by client
in N one-thread processes at once, each training every N-th batch (data-parallel plain PyTorch: what the
parallel engine's processes could reach; its evaluation figures are one process's, each evaluates the whole
test set).

    .venv/bin/python benchmarks/throughput.py                                    # SmartSplit, ceiling at 1 and 2 threads
    .venv/bin/python benchmarks/throughput.py --set threads=2                    # any --set goes to smartsplit run
    .venv/bin/python benchmarks/throughput.py --flower /tmp/flwr-venv/bin/python # and Flower (benchmarks/flower_workload.py)
    .venv/bin/python benchmarks/throughput.py --ceiling-processes 2              # and the ceiling as 2 processes at once
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1024  # ru_maxrss and /proc figures are KiB
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # SmartSplit's normalisation (smartsplit.data.datasets._NORM)


def cnn(in_channels: int = 1, num_classes: int = 10):
    """The workload's model, a SmartSplit user model (``model.name: throughput:cnn``, benchmarks/ on PYTHONPATH)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, num_classes),
    )


# --------------------------------------------------------------------------- measuring a process


def _tree_memory_kb(root: int) -> int:
    """Summed PSS (RSS where PSS cannot be read) of ``root`` and every descendant, KiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
            except OSError:
                pass
    return total


def launch(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``command`` to its end: wall time from launch to exit, its peak RSS (wait4: the largest process of its
    tree, waited-for children included) and the peak summed PSS of its tree, sampled every second by a thread."""
    return launch_all([command], [log], env)


def launch_all(commands: list[list[str]], logs: list[Path], env: dict | None = None) -> dict:
    """``launch`` for ``commands`` started at once: wall time until the last exits, the largest peak RSS, the
    peak of their trees' summed PSS, CPU times summed; rc is the first non-zero exit status, else 0."""
    import threading

    stop, tree_kb = threading.Event(), [0]
    started = time.perf_counter()
    outs = [open(log, "w") for log in logs]
    children = [subprocess.Popen(c, stdout=o, stderr=subprocess.STDOUT, env=env) for c, o in zip(commands, outs)]

    def sample() -> None:
        while not stop.wait(1.0):
            tree_kb[0] = max(tree_kb[0], sum(_tree_memory_kb(c.pid) for c in children))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    codes, rss, user, system = [], 0.0, 0.0, 0.0
    for child in children:
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        codes.append(child.returncode)
        rss, user, system = max(rss, usage.ru_maxrss / MB), user + usage.ru_utime, system + usage.ru_stime
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    for out in outs:
        out.close()
    return {"rc": next((c for c in codes if c), 0), "process_s": wall, "peak_rss_mb": rss,
            "peak_tree_pss_mb": tree_kb[0] / MB, "user_s": user, "sys_s": system, "log": str(logs[0])}


def tail(path: str, lines: int = 15) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- SmartSplit's process


def smartsplit_child(timers_path: str, cli_args: list[str]) -> int:
    """``smartsplit.cli.main(cli_args)``, with timers around the engine's calls, written to ``timers_path``. The
    timers go in once the run has started its workers (``WorkerPool.for_run``, which the CLI calls before it
    imports torch), so that this process imports torch when the CLI would, not before."""
    import smartsplit.cli as cli
    from smartsplit.runtime.pool import WorkerPool

    timers: dict = {"rounds": [], "outside_rounds": {}}
    for_run = WorkerPool.for_run.__func__

    def start_workers_then_timers(cls, config):
        pool = for_run(cls, config)
        install_timers(timers)
        return pool

    WorkerPool.for_run = classmethod(start_workers_then_timers)
    try:
        return cli.main(cli_args)
    finally:
        Path(timers_path).write_text(json.dumps(timers))


def install_timers(timers: dict) -> None:
    """Timers around the engine's calls: each round's (``timers["rounds"]``) and the rest (``outside_rounds``)."""
    from smartsplit.engine import experiment as engine
    from smartsplit.roles import central

    current: dict | None = None
    running: set[str] = set()  # keys being timed now: a call inside another of the same key is not counted twice

    def timer(key: str, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if key in running:
                return original(*args, **kwargs)
            running.add(key)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                running.discard(key)
                bucket = current if current is not None else timers["outside_rounds"]
                bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - started
                bucket[key + "_calls"] = bucket.get(key + "_calls", 0) + 1

        return wrapper

    def timed(owner, name: str, key: str) -> None:
        setattr(owner, name, timer(key, getattr(owner, name)))

    run_round = engine.Experiment.run_round

    @functools.wraps(run_round)
    def timed_round(self, rnd):
        nonlocal current
        current = {"round": rnd + 1}
        started = time.perf_counter()
        try:
            return run_round(self, rnd)
        finally:
            current["round_s"] = time.perf_counter() - started
            timers["rounds"].append(current)
            current = None

    init = timer("setup_s", engine.Experiment.__init__)  # data, model, fleet, roles, the meter's process

    @functools.wraps(init)
    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.executor is not None:  # another engine (parallel, ray) runs the rounds' training: time it
            self.executor = timer("device_training_s", self.executor)

    engine.Experiment.run_round = timed_round
    engine.Experiment.__init__ = timed_init
    timed(engine.Experiment, "candidates", "planning_s")  # every device planned at every cut
    timed(engine.Experiment, "train_here", "device_training_s")  # the round engine: the devices' local steps
    timed(central, "evaluate", "eval_s")  # the global model on the test set
    finish = timer("finish_s", central.CentralRole.finish_round)  # aggregation, the strategy's bookkeeping, evaluation

    @functools.wraps(finish)
    def timed_finish(self, *args, **kwargs):
        evaluator = getattr(self, "evaluator", None)  # what scores the test set, where the engine may set its own
        if evaluator is not None and not getattr(evaluator, "timed", False):
            self.evaluator = timer("eval_s", evaluator)
            self.evaluator.timed = True
        return finish(self, *args, **kwargs)

    central.CentralRole.finish_round = timed_finish


def run_smartsplit(args, workdir: Path, variant: list[str] = (), tag: str = "") -> dict:
    run_dir, timers_path = workdir / f"smartsplit{tag}-run", workdir / f"smartsplit{tag}-timers.json"
    sets = [*args.set, *variant]
    cli_args = ["run", args.config, *[a for s in sets for a in ("--set", s)], "--out", str(run_dir), "--overwrite",
                "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    timers_path.unlink(missing_ok=True)
    measured = launch([sys.executable, __file__, "--smartsplit-child", str(timers_path), "--", *cli_args],
                      workdir / f"smartsplit{tag}.log", env)
    measured["command"] = "PYTHONPATH=benchmarks smartsplit " + shlex.join(cli_args)
    if measured["rc"] != 0 or not (run_dir / "metrics.jsonl").exists():
        raise SystemExit(f"smartsplit run failed (exit {measured['rc']}); last lines of {measured['log']}:\n"
                         f"{tail(measured['log'])}")
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timers = json.loads(timers_path.read_text())
    if len(timers["rounds"]) != len(records):
        raise SystemExit(f"timed {len(timers['rounds'])} rounds but metrics.jsonl has {len(records)}")
    t = config["training"]
    rounds = []
    for rec, tim in zip(records, timers["rounds"]):
        devices = rec["devices"]
        rounds.append({
            "round": rec["round"], "wall_s": rec["wall_s"], "timed_round_s": tim["round_s"],
            "eval_s": tim.get("eval_s", 0.0), "evaluations": tim.get("eval_s_calls", 0),
            "planning_s": tim.get("planning_s", 0.0), "device_training_s": tim.get("device_training_s"),
            "aggregation_s": tim.get("finish_s", 0.0) - tim.get("eval_s", 0.0),
            "samples": sum(d["samples"] for d in devices), "steps": sum(d["steps"] for d in devices),
            "accuracy": rec["accuracy"],
            # the ceiling trains these: each device's batches, full ones then its short last one
            "batches": [b for d in devices for b in _batch_sizes(d["samples"], d["steps"], t["batch_size"])],
            # the large-batch ceiling trains, at each local step, every device's batch of that step as one batch
            "large_batches": _large_batches([_batch_sizes(d["samples"], d["steps"], t["batch_size"]) for d in devices]),
        })
    untimed = [r["round"] for r in rounds if r["accuracy"] is not None and not r["evaluations"]]
    if untimed:
        raise SystemExit(f"rounds {untimed} evaluated the model but no evaluation was timed: SmartSplit's engine has "
                         "changed; update smartsplit_child's timers")
    samples = sum(r["samples"] for r in rounds)
    eval_s = sum(r["eval_s"] for r in rounds)
    train_s = sum(r["wall_s"] - r["eval_s"] for r in rounds)
    device_s = [r["device_training_s"] for r in rounds]
    evaluations = sum(r["evaluations"] for r in rounds)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    engine = config.get("engine", "sequential")  # engine and workers: where rounds train (sequential: here)
    return {
        "name": f"smartsplit {config['strategy']['name']} ({config['threads']} thread{'s' * (config['threads'] > 1)}"
                + (f", {engine} x{config.get('workers') or 'auto'}" if engine != "sequential" else "")
                + (f", grouping {config['training']['grouping']}" if config["training"].get("grouping", "auto") != "auto"
                   else "")
                + (f", {config['memory_format']})" if config.get("memory_format", "contiguous") != "contiguous" else ")"),
        **measured, "config": config, "rounds": rounds, "samples": samples, "steps": sum(r["steps"] for r in rounds),
        "train_s": train_s, "eval_s": eval_s, "evaluations": evaluations, "test_examples": None,
        "planning_s": sum(r["planning_s"] for r in rounds), "aggregation_s": sum(r["aggregation_s"] for r in rounds),
        "device_training_s": None if None in device_s else sum(device_s),
        "setup_s": timers["outside_rounds"].get("setup_s", 0.0), "run_wall_s": summary.get("wall_s"),
        "final_accuracy": rounds[-1]["accuracy"], "run_dir": str(run_dir),
        "round_train_s": [r["wall_s"] - r["eval_s"] for r in rounds], "round_samples": [r["samples"] for r in rounds],
    }


def _large_batches(per_device: list[list[int]]) -> list[int]:
    """Step j's batches of all the devices that take a step j, as one batch per j."""
    steps = max((len(b) for b in per_device), default=0)
    return [sum(b[j] for b in per_device if j < len(b)) for j in range(steps)]


def _batch_sizes(samples: int, steps: int, batch: int) -> list[int]:
    last = samples - batch * (steps - 1)
    if steps >= 1 and 1 <= last <= batch:
        return [batch] * (steps - 1) + [last]
    return [samples // steps + (i < samples % steps) for i in range(steps)]  # not SmartSplit's shape: spread evenly


# --------------------------------------------------------------------------- the ceiling


def read_idx(path: Path):
    import numpy as np

    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def load_fmnist(root: str):
    """Fashion-MNIST as SmartSplit holds it: float32 N x 1 x 28 x 28, /255, then (x - mean) / std; int64 labels."""
    import numpy as np
    import torch

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (Path(root) / name).exists():
                return Path(root) / name
        raise SystemExit(f"{stem}[.gz] not found in {root}")

    def images(stem: str):
        return torch.tensor(read_idx(find(stem))[:, None]).float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)

    def labels(stem: str):
        return torch.from_numpy(read_idx(find(stem)).astype(np.int64))

    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def ceiling_child(plan_path: str, result_path: str) -> None:
    """One model, one optimizer, SmartSplit's batches in a plain loop, the same evaluations after each round."""
    import torch
    import torch.nn.functional as F

    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(plan["threads"])
    x, y, x_test, y_test = load_fmnist(plan["root"])
    torch.manual_seed(plan["seed"])
    model = cnn()
    if plan["memory_format"] == "channels_last":  # as SmartSplit's memory_format: channels_last lays it out
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan["lr"], momentum=plan["momentum"])
    g = torch.Generator().manual_seed(plan["seed"])
    order, rounds = torch.randperm(len(y), generator=g), []
    for batches in plan["rounds"]:
        started = time.perf_counter()
        for size in batches:
            if len(order) < size:
                order = torch.cat([order, torch.randperm(len(y), generator=g)])
            idx, order = order[:size], order[size:]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(y_test), plan["eval_batch"]):
                logits = model(x_test[start:start + plan["eval_batch"]])
                F.cross_entropy(logits, y_test[start:start + plan["eval_batch"]], reduction="sum").item()
                correct += (logits.argmax(1) == y_test[start:start + plan["eval_batch"]]).sum().item()
        rounds.append({"samples": sum(batches), "steps": len(batches), "train_s": train_s,
                       "eval_s": time.perf_counter() - started, "accuracy": correct / len(y_test)})
    Path(result_path).write_text(json.dumps({"rounds": rounds, "test_examples": len(y_test)}))


def run_ceiling(threads: int, smartsplit: dict, workdir: Path, large: bool = False,
                memory_format: str = "contiguous", processes: int = 1) -> dict:
    """Plain PyTorch on SmartSplit's samples: one device's batch at a time, or (``large``) each local step's
    batches of all the round's devices as one batch: the arithmetic ceiling, what the samples cost when nothing
    keeps them apart; its convolution weights laid out in ``memory_format``. With ``processes`` > 1 (client by
    client only), that many processes of ``threads`` threads each train every ``processes``-th batch at once:
    what data-parallel training of the same samples costs on this machine, the ceiling of the parallel engine."""
    c = smartsplit["config"]
    tag = (f"{'large-' if large else ''}{f'{processes}x' if processes > 1 else ''}{threads}"
           f"{'' if memory_format == 'contiguous' else '-' + memory_format}")
    if c["training"]["optimizer"] != "sgd" or c["data"]["dataset"] != "fashion-mnist" or c["data"].get("pad_to"):
        raise SystemExit("the ceiling knows SGD on unpadded Fashion-MNIST only; keep those in the config")
    if large and processes > 1:
        raise SystemExit("the ceiling runs as one large batch in one process only")
    commands, results = [], []
    for p in range(processes):
        plan_path, result_path = workdir / f"ceiling-{tag}-{p}-plan.json", workdir / f"ceiling-{tag}-{p}.json"
        plan_path.write_text(json.dumps({
            "threads": threads, "seed": c["seed"], "lr": c["training"]["lr"], "momentum": c["training"]["momentum"],
            "memory_format": memory_format,
            "eval_batch": c["training"]["eval_batch_size"],
            "rounds": [r["large_batches" if large else "batches"][p::processes] for r in smartsplit["rounds"]],
            "root": c["data"]["root"] or "/usr/share/datasets/fashion-mnist",
        }))
        commands.append([sys.executable, __file__, "--ceiling-child", str(plan_path), str(result_path)])
        results.append(result_path)
    measured = launch_all(commands, [workdir / f"ceiling-{tag}-{p}.log" for p in range(processes)])
    if measured["rc"] != 0:
        raise SystemExit(f"the ceiling failed (exit {measured['rc']}):\n{tail(measured['log'])}")
    outs = [json.loads(r.read_text()) for r in results]
    rounds = []  # the processes' rounds side by side: samples and steps add up, a round lasts as its slowest
    for each in zip(*(o["rounds"] for o in outs)):
        rounds.append({"samples": sum(r["samples"] for r in each), "steps": sum(r["steps"] for r in each),
                       "train_s": max(r["train_s"] for r in each), "eval_s": max(r["eval_s"] for r in each),
                       "accuracy": each[0]["accuracy"]})
    kind = "one large batch" if large else "client by client"
    layout = "" if memory_format == "contiguous" else f", {memory_format}"
    width = f"{processes} proc x {threads} thr" if processes > 1 else f"{threads} thr"
    return {"name": f"plain PyTorch, {kind} ({width}{layout})", **measured, "rounds": rounds,
            "samples": sum(r["samples"] for r in rounds), "steps": sum(r["steps"] for r in rounds),
            "train_s": sum(r["train_s"] for r in rounds), "eval_s": sum(r["eval_s"] for r in rounds),
            "evaluations": len(rounds), "test_examples": outs[0]["test_examples"], "final_accuracy": rounds[-1]["accuracy"],
            "round_train_s": [r["train_s"] for r in rounds], "round_samples": [r["samples"] for r in rounds]}


# --------------------------------------------------------------------------- Flower


def run_flower(python: str, smartsplit: dict, workdir: Path) -> dict:
    c, t = smartsplit["config"], smartsplit["config"]["training"]
    result_path = workdir / "flower.json"
    result_path.unlink(missing_ok=True)
    command = [python, str(HERE / "flower_workload.py"), "--root", c["data"]["root"] or "/usr/share/datasets/fashion-mnist",
               "--clients", str(c["fleet"]["devices"]), "--per-round", str(t["devices_per_round"]),
               "--rounds", str(t["rounds"]), "--epochs", str(int(t["local_epochs"] or 1)), "--batch", str(t["batch_size"]),
               "--lr", str(t["lr"]), "--alpha", str(c["data"]["alpha"]), "--seed", str(c["seed"]),
               "--eval-batch", str(t["eval_batch_size"]), "--server-threads", str(c["threads"]), "--result", str(result_path)]
    if t["local_epochs"] is None or t["momentum"] or t["optimizer"] != "sgd" or c["data"]["partition"] != "dirichlet":
        print("note: flower_workload.py runs SGD without momentum, local epochs, a Dirichlet partition; the "
              "SmartSplit config differs", file=sys.stderr)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    measured = launch(command, workdir / "flower.log", env)
    measured["command"] = shlex.join(command)
    if measured["rc"] != 0 or not result_path.exists():
        raise SystemExit(f"the Flower run failed (exit {measured['rc']}); last lines of {measured['log']}:\n"
                         f"{tail(measured['log'], 30)}")
    out = json.loads(result_path.read_text())
    return {"name": f"flower {out['flwr']} (2 clients at once)", **measured, **{k: out[k] for k in (
        "rounds", "evals", "samples", "steps", "train_s", "eval_s", "evaluations", "test_examples", "client_train_s",
        "first_round_at_s", "final_accuracy", "errors")}, "own_peak_rss_mb": out["peak_rss_mb"],
            "round_train_s": [r["train_s"] for r in out["rounds"]], "round_samples": [r["samples"] for r in out["rounds"]]}


# --------------------------------------------------------------------------- the table


def figures(row: dict, test_examples: int) -> dict:
    n = row.get("test_examples") or test_examples
    later_s, later_samples = sum(row["round_train_s"][1:]), sum(row["round_samples"][1:])
    return {"train_sps": row["samples"] / row["train_s"], "train_sps_after_1": later_samples / later_s if later_s else None,
            "eval_sps": row["evaluations"] * n / row["eval_s"], "process_sps": row["samples"] / row["process_s"]}


NAME = 64


def print_table(rows: list[dict]) -> None:
    head = (f"{'run':<{NAME}} {'samples':>7} {'train s':>7} {'train smp/s':>11} {'rounds 2+':>9} {'evals':>5} "
            f"{'eval s':>6} {'eval smp/s':>10} {'process s':>9} {'process smp/s':>13} {'peak RSS MB':>11} "
            f"{'tree PSS MB':>11} {'acc':>5}")
    print(head)
    print("-" * len(head))
    for row in rows:
        f = row["figures"]
        later = "-" if f["train_sps_after_1"] is None else f"{f['train_sps_after_1']:.0f}"
        print(f"{row['name']:<{NAME}} {row['samples']:>7} {row['train_s']:>7.1f} {f['train_sps']:>11.0f} {later:>9} "
              f"{row['evaluations']:>5} {row['eval_s']:>6.1f} {f['eval_sps']:>10.0f} {row['process_s']:>9.1f} "
              f"{f['process_sps']:>13.0f} {row['peak_rss_mb']:>11.0f} {row['peak_tree_pss_mb']:>11.0f} "
              f"{row['final_accuracy']:>5.3f}")


def ratio(a: dict, b: dict) -> dict:
    out = {k: (a["figures"][k] / b["figures"][k] if a["figures"][k] and b["figures"][k] else None) for k in a["figures"]}
    out["peak_rss"] = a["peak_rss_mb"] / b["peak_rss_mb"]
    out["peak_tree_pss"] = a["peak_tree_pss_mb"] / b["peak_tree_pss_mb"] if b["peak_tree_pss_mb"] else None
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--smartsplit-child":  # the measured SmartSplit process
        sys.exit(smartsplit_child(sys.argv[2], sys.argv[4:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--ceiling-child":  # the measured ceiling process
        ceiling_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="benchmarks/throughput.yaml")
    parser.add_argument("--set", "--extra-set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to smartsplit run as --set KEY=VALUE (repeat it), e.g. threads=2")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also run SmartSplit with these settings, e.g. engine=parallel,workers=2 (repeat it)")
    parser.add_argument("--threads", default="1,2", help="torch threads of the plain PyTorch ceiling runs")
    parser.add_argument("--memory-formats", default="contiguous", help="layouts of the ceiling's convolution weights "
                        "(contiguous, channels_last or both, comma-separated): the ceiling for a SmartSplit run with "
                        "memory_format=channels_last is the plain loop laid out so too")
    parser.add_argument("--flower", metavar="PYTHON", help="a Python with flwr[simulation]==1.42.0 and torch: also "
                        "run benchmarks/flower_workload.py with it")
    parser.add_argument("--ceiling-processes", default="", metavar="N[,N]",
                        help="also run the client-by-client ceiling as N processes of 1 thread at once, each training "
                             "every N-th batch (the parallel engine's ceiling: data-parallel plain PyTorch)")
    parser.add_argument("--out", default="runs/throughput/throughput.json",
                        help="results as JSON; logs and SmartSplit's run folder go beside it")
    args = parser.parse_args()
    out = Path(args.out)
    workdir = out.parent
    workdir.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"measured on {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
          f"{torch.__version__}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the start; "
          f"{args.config} {' '.join('--set ' + s for s in args.set)}".rstrip(), flush=True)
    started = time.perf_counter()
    ss = run_smartsplit(args, workdir)
    print(f"smartsplit: {ss['samples']} samples in {len(ss['rounds'])} rounds, {ss['process_s']:.1f} s "
          f"({ss['command']})", flush=True)
    rows = [ss]
    for n, variant in enumerate(args.variant, 1):
        rows.append(run_smartsplit(args, workdir, [v for v in variant.split(",") if v], f"-{n}"))
        print(f"{rows[-1]['name']}: {rows[-1]['process_s']:.1f} s ({rows[-1]['command']})", flush=True)
    for memory_format in [v.strip() for v in args.memory_formats.split(",") if v.strip()]:
        for threads in [int(v) for v in args.threads.split(",") if v.strip()]:
            for large in (False, True):
                rows.append(run_ceiling(threads, ss, workdir, large, memory_format))
                print(f"{rows[-1]['name']}: {rows[-1]['process_s']:.1f} s", flush=True)
        for processes in [int(v) for v in args.ceiling_processes.split(",") if v.strip()]:
            rows.append(run_ceiling(1, ss, workdir, False, memory_format, processes))
            print(f"{rows[-1]['name']}: {rows[-1]['process_s']:.1f} s", flush=True)
    plain = [r for r in rows if r["name"].startswith("plain")]
    test_examples = plain[0]["test_examples"] if plain else 10000  # the test set's size, as the ceiling read it
    if args.flower:
        rows.append(run_flower(args.flower, ss, workdir))
        print(f"{rows[-1]['name']}: {rows[-1]['process_s']:.1f} s ({rows[-1]['command']})", flush=True)
    for row in rows:
        row["figures"] = figures(row, test_examples)
    print()
    print_table(rows)
    if not args.flower:
        print("flower: skipped (give --flower /path/to/python with flwr[simulation]==1.42.0 to run it)")
    print("train smp/s: samples / the rounds' time less their evaluations (rounds 2+: the same without round 1); "
          "eval smp/s: test examples evaluated / evaluation time; process smp/s: samples / launch to exit; peak RSS: "
          "largest process (wait4, children included); tree PSS: summed over the process tree, sampled every second")
    print("training seconds per round:")
    for row in rows:
        print(f"  {row['name']:<{NAME}} " + " ".join(f"{v:5.1f}" for v in row["round_train_s"]))

    # SmartSplit's time, by where it went
    device = ss["device_training_s"]
    other = ss["train_s"] - ss["planning_s"] - ss["aggregation_s"] - (device or 0.0)
    print(f"smartsplit breakdown: setup (data, model, fleet, meter) {ss['setup_s']:.1f} s; in the rounds: planning "
          f"{ss['planning_s']:.1f} s (round 1: {ss['rounds'][0]['planning_s']:.1f} s), device training "
          + (f"{device:.1f} s ({ss['samples'] / device:.0f} samples/s)" if device else "not timed")
          + f", aggregation and strategy {ss['aggregation_s']:.1f} s, evaluation {ss['eval_s']:.1f} s, other "
          f"{other:.1f} s; outside the rounds (start-up, imports, setup, state saves, exit) "
          f"{ss['process_s'] - sum(r['wall_s'] for r in ss['rounds']):.1f} s of {ss['process_s']:.1f} s")
    for row in rows:
        if row["name"].startswith("flower"):
            print(f"flower breakdown: strategy started {row['first_round_at_s']:.1f} s into the process; round 1 "
                  f"includes starting Ray's actors and their data loading; clients' own training "
                  f"{row['client_train_s']:.1f} s summed over clients (2 at once); {row['errors']} failed replies")

    print()
    ceilings = [r for r in rows if r["name"].startswith("plain")]
    others = [r for r in rows if not r["name"].startswith("plain")]
    flower = [r for r in others if r["name"].startswith("flower")]
    pairs = [(a, b) for a in others for b in ceilings] + [(a, f) for a in others for f in flower if a is not f]
    ratios = {}
    for a, b in pairs:
        r = ratios[f"{a['name']} / {b['name']}"] = ratio(a, b)
        later = "-" if r["train_sps_after_1"] is None else f"{r['train_sps_after_1']:.2f}x"
        print(f"{a['name']} / {b['name']}: train {r['train_sps']:.2f}x (rounds 2+ {later}), eval {r['eval_sps']:.2f}x, "
              f"process {r['process_sps']:.2f}x, peak RSS {r['peak_rss']:.2f}x")
    print(f"\nwall time of the benchmark: {time.perf_counter() - started:.0f} s; load average at the end "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "argv": sys.argv, "rows": rows,
                               "ratios": ratios}, indent=1, default=str))
    print(f"results: {out}; logs and SmartSplit's run folder: {workdir}")


if __name__ == "__main__":
    main()
