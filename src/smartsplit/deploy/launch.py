"""``smartsplit launch CONFIG --local``: the whole deployment on this machine, one process per role, on loopback.

It writes certificates into the run folder (``certs/``), starts the central server, the config's edge servers
and one process per device of the fleet, each with its log in ``logs/``, waits for the server to finish the
run and for the others to leave, and returns the server's summary. The run folder is the one ``smartsplit
run`` writes, with the wall-clock seconds of each round (``wall_s``) beside the simulated ones, and for every
round the faults seen and the bytes that crossed the device-edge links (``faults``, ``wire``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from smartsplit.config import Config
from smartsplit.deploy.limits import limit_cpu
from smartsplit.deploy.netns import DeviceNetwork
from smartsplit.errors import SmartSplitError
from smartsplit.reports.summary import RunSummary

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], log_path: Path, network: DeviceNetwork | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "smartsplit", *command]
    return subprocess.Popen(network.wrap(argv) if network is not None else argv, stdout=out,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def launch_local(config_path: str, overrides: list[str], config: Config, run_dir: Path, *, overwrite: bool = False,
                 resume: bool = False, insecure: bool = False, meter: bool = True, timeout_s: float = 60.0,
                 budget: str = "trace", enforce_budget: bool = False, progress: bool = True,
                 cpu_shares: dict[int, float] | None = None,
                 networks: dict[int, DeviceNetwork] | None = None) -> RunSummary:
    """Run ``config`` as a deployment on loopback; see the module's docstring. ``cpu_shares``: device id -> the
    share of one core its process may use (a CPU quota, ``limits.limit_cpu``); ``networks``: device id -> the
    shaped network namespace its process runs in (``netns``; the edges then listen on every address)."""
    from smartsplit.runtime.folder import check_run_folder

    check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    devices, edges = config.fleet.devices, len(config.edge.speeds())
    security = _security(run_dir / "certs", insecure, devices, edges)
    logs = run_dir / "logs"
    if not resume:
        for old in logs.glob("*.log"):
            old.unlink()
    server_port = free_port()
    edge_ports = [free_port() for _ in range(edges)]
    sets = [a for o in overrides for a in ("--set", o)]
    server = _start(["server", config_path, *sets, "--listen", f"127.0.0.1:{server_port}", "--out", str(run_dir),
                     *(["--resume"] if resume else ["--overwrite"] if overwrite else []), *security],
                    logs / "server.log")
    device_options = ["--budget", budget, *(["--enforce-budget"] if enforce_budget else []),
                      *([] if meter else ["--no-meter"]), *security]
    others = _start_edges_and_devices(server_port, edge_ports, devices, timeout_s, security, device_options, logs,
                                      networks or {})
    log.info("launched the central server, %d edge servers and %d devices on loopback; logs in %s", edges, devices, logs)
    quotas = []
    try:
        for d, share in (cpu_shares or {}).items():
            quotas.append(limit_cpu(others[edges + d].pid, share, f"{run_dir.name}-device-{d}-{others[edges + d].pid}"))
        code = _wait(server, progress, run_dir, config.training.rounds)
        deadline = time.monotonic() + 30
        for p in others:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in [server, *others]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in [server, *others]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for quota in quotas:
            quota.remove()
    if code != 0:
        tail = (logs / "server.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise SmartSplitError(f"the central server stopped with exit code {code}; see {logs / 'server.log'}:\n  "
                              + "\n  ".join(tail))
    summary_path = run_dir / "summary.json"
    return RunSummary(**json.loads(summary_path.read_text()))


def _security(certs: Path, insecure: bool, devices: int, edges: int) -> list[str]:
    """Every process's TLS options: certificates written for this run into ``certs`` (or none, ``insecure``)."""
    if insecure:
        return ["--insecure"]
    from smartsplit.deploy.certs import write_certs

    write_certs(certs, devices=devices, edges=edges, overwrite=True)
    return ["--certs", str(certs)]


def _start_edges_and_devices(server_port: int, edge_ports: list[int], devices: int, timeout_s: float,
                             security: list[str], device_options: list[str], logs: Path,
                             networks: dict[int, DeviceNetwork]) -> list[subprocess.Popen]:
    """The edge processes, then one process per device (device ``d`` at ``others[len(edge_ports) + d]``), each in
    its network namespace where it has one."""
    edges, listen = len(edge_ports), "0.0.0.0" if networks else "127.0.0.1"
    others = [
        _start(["edge", "--server", f"127.0.0.1:{server_port}", "--listen", f"{listen}:{edge_ports[e]}",
                "--name", f"edge-{e}", "--timeout", str(timeout_s), *security], logs / f"edge-{e}.log")
        for e in range(edges)
    ]
    return others + [
        _start(["device", "--edge", f"{networks[d].host_ip if d in networks else '127.0.0.1'}:{edge_ports[d % edges]}",
                "--id", str(d), *device_options], logs / f"device-{d}.log", networks.get(d))
        for d in range(devices)
    ]


def _wait(server: subprocess.Popen, progress: bool, run_dir: Path, rounds: int) -> int:
    metrics, seen = run_dir / "metrics.jsonl", 0
    while True:
        code = server.poll()
        if metrics.exists():
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            for record in lines[seen:]:
                if progress:
                    accuracy = "not evaluated" if record["accuracy"] is None else f"{record['accuracy']:.4f}"
                    clock = "measured" if record.get("clock") == "measured" else "simulated"
                    print(f"round {record['round']}/{rounds}: accuracy {accuracy}, wall "
                          f"{record['wall_s']:.1f} s, {clock} {record['latency_s']:.1f} s"
                          + (f", faults {record['faults']}" if record.get("faults") else ""), file=sys.stderr)
            seen = max(seen, len(lines))
        if code is not None:
            return code
        time.sleep(0.5)
