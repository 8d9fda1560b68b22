"""``smartsplit testbed CONFIG --out DIR``: the config's fleet as an emulated testbed on this machine.

Each device is a process of a free-running deployment (``deployment.pace: free``) given its class's resources by
the kernel where it can: a share of one core from its sustained speed (a CPU quota), its memory budget (a memory
cgroup, ``--enforce-budget``, following its budget trace) and its link (shaped in the link layer at its class's
bandwidth, plus the edge latency). One time scale, wall seconds per second of the fleet's time, is chosen so that
a round's devices fit the host's cores; it stretches the links and the traces alike. Each strategy's run is
measured round by round beside the simulator's prediction for the same plans on the same scaled resources
(the edge's speed set to what its process gets here), written to ``DIR/testbed.json`` with a figure and a page.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from smartsplit.config import Config, load_config
from smartsplit.data import load_data
from smartsplit.deploy.launch import launch_local
from smartsplit.deploy.limits import cpu_quota_unavailable, enforcement_unavailable
from smartsplit.deploy.netns import device_network, network_unavailable
from smartsplit.engine.build import build_architecture, build_fleet
from smartsplit.errors import SmartSplitError
from smartsplit.kernels.step import make_optimizer
from smartsplit.models.profile import BACKWARD_FLOPS, profile_chain
from smartsplit.records import strict_json
from smartsplit.reports.testbed import fidelity, write_testbed_report

log = logging.getLogger(__name__)

LINK = "link-layer token bucket: each message waits its bytes at the class's bandwidth, plus edge.latency_s"
KERNEL_LINK = ("a veth pair per device into its own network namespace, tbf at the class's bandwidth each way; "
               "edge.latency_s added by the link layer (no netem here)")


def host_facts() -> dict:
    """What the host is: CPU model, cores this process may use, kernel, machine, and whether it runs as root."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"cpu": model, "cores": cores, "kernel": platform.release(), "machine": platform.machine(),
            "root": hasattr(os, "geteuid") and os.geteuid() == 0}


def core_flops(config: Config, repeats: int = 12) -> float:
    """FLOP/s one core of this host sustains training the config's model (a whole step at the batch size, one
    thread; the median of ``repeats`` steps after two to warm up), counted as the clock model counts them."""
    train, _ = load_data(config)
    model = build_architecture(config, train)
    batch = config.training.batch_size
    profile = profile_chain(model, train.shape, batch)
    x, y = train.x[:batch], train.y[:batch]
    t = config.training
    optimizer = make_optimizer(list(model.parameters()), t.optimizer, t.lr, t.momentum)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(repeats + 2):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return (1 + BACKWARD_FLOPS) * profile.flops(1, profile.num_units) / statistics.median(times[2:])


def time_scale(device_flops: list[float], per_round: int, cores: int, core: float) -> float:
    """Wall seconds per second of the fleet's time: at least 1, and enough that the fastest device needs at most
    one core and the ``per_round`` fastest together fit the cores left beside the edge and the server (one)."""
    fastest = sorted(device_flops, reverse=True)
    usable = max(cores - 1, 1)
    return max(1.0, fastest[0] / core, sum(fastest[:per_round]) / (usable * core))


def emulation() -> dict[str, str]:
    """Which mechanism emulates each resource here (without root or cgroups: none, said with the reason)."""
    cpu, memory, network = cpu_quota_unavailable(), enforcement_unavailable(), network_unavailable()
    return {
        "cpu": "cgroup CPU quota (share of one core from the class's sustained speed)" if cpu is None
        else f"unshaped: every device runs at the host's speed ({cpu})",
        "memory": "cgroup memory limit (--enforce-budget, following the budget trace)" if memory is None
        else f"unshaped: no kernel limit ({memory}); budgets are the planner's only",
        "network": KERNEL_LINK if network is None else f"{LINK} (kernel shaping unavailable: {network})",
    }


def run_testbed(config_path: str, overrides: list[str], out_dir: str | Path, strategies: list[str], *,
                progress: bool = False) -> dict:
    """Run each strategy on the emulated testbed; write and return ``testbed.json``'s content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(config_path, overrides)
    host, emulated = host_facts(), emulation()
    core = core_flops(config)
    devices = build_fleet(config)
    scale = time_scale([d.flops_per_s for d in devices], config.training.devices_per_round, host["cores"], core)
    shares = {d.id: min(d.flops_per_s / (scale * core), 1.0) for d in devices} if emulated["cpu"].startswith("cgroup") else None
    log.info("testbed: %s, %d cores at %.1f GFLOP/s each for this model; time scale %.3g; cpu: %s; memory: %s",
             host["cpu"], host["cores"], core / 1e9, scale, emulated["cpu"], emulated["memory"])
    result = {"host": {**host, "core_gflops": core / 1e9}, "time_scale": scale, "emulation": emulated,
              "strategies": {}}
    for name in strategies:
        run_dir = out / name
        sets = [*overrides, f"strategy.name={name}", f"name={config.name}-{name}", "deployment.pace=free",
                "deployment.shape_links=true", f"deployment.time_scale={scale!r}",
                f"edge.gflops={scale * core / 1e9!r}"]  # the edge's process runs unthrottled on one core
        kernel_links = emulated["network"] == KERNEL_LINK
        sets += ["deployment.kernel_links=true"] if kernel_links else []
        run_config = load_config(config_path, sets)
        tag = str(os.getpid() % 100000)
        networks = {}
        try:
            for d in devices if kernel_links else []:
                networks[d.id] = device_network(d.id, d.uplink_bytes_per_s / scale, d.downlink_bytes_per_s / scale, tag)
            summary = launch_local(config_path, sets, run_config, run_dir, overwrite=True, meter=False,
                                   enforce_budget=emulated["memory"].startswith("cgroup"), cpu_shares=shares,
                                   networks=networks, progress=progress)
        finally:
            for net in networks.values():
                net.remove()
        result["strategies"][name] = _measured(run_dir, summary.final_accuracy)
        (out / "testbed.json").write_text(strict_json(result, indent=2))  # written as each strategy ends
    write_testbed_report(result, out)
    return result


def _measured(run_dir: Path, accuracy: float | None) -> dict:
    """Per round: measured latency, the simulator's for the same plans, participants, the slowest device's times."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    decisions = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines() if line.strip()]
    rounds = []
    for record, decision in zip(metrics, decisions):
        predicted = [a["predicted_round_s"] for a in decision["assignments"] if a.get("predicted_round_s") is not None]
        trained = [d for d in record["devices"] if d["steps"]]
        slowest = max(trained, key=lambda d: d["finish_s"], default=None)
        rounds.append({"round": record["round"], "measured_s": record["latency_s"] if trained else None,
                       "simulated_s": max(predicted) if predicted else None, "participants": record["participants"],
                       "slowest": None if slowest is None else {k: slowest[k] for k in (
                           "device", "class", "cut", "finish_s", "comm_s", "wait_s", "paused_s")}})
    measured = [r["measured_s"] for r in rounds if r["measured_s"] is not None]
    simulated = [r["simulated_s"] for r in rounds if r["simulated_s"] is not None]
    if not measured:
        raise SmartSplitError(f"testbed: no device trained in any round of {run_dir}; see its logs/")
    return {"rounds": rounds, "peak_measured_s": max(measured), "peak_simulated_s": max(simulated, default=None),
            "accuracy": accuracy, "fidelity": fidelity(rounds), "fidelity_after_round_1": fidelity(rounds, True)}
