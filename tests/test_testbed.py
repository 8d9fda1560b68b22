"""The emulated testbed: its time scale, and a whole (tiny) testbed run through the CLI, its mechanisms labelled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("grpc", reason="the testbed is a deployment: grpcio comes with the deploy extra")

from smartsplit.deploy.limits import cpu_quota_unavailable, enforcement_unavailable  # noqa: E402
from smartsplit.deploy.netns import network_unavailable  # noqa: E402
from smartsplit.deploy.testbed import time_scale  # noqa: E402


def test_the_time_scale_fits_a_rounds_devices_on_the_cores_beside_the_edge() -> None:
    core = 30e9
    assert time_scale([2e9, 15e9], per_round=2, cores=4, core=core) == 1.0  # slow devices: real time
    assert time_scale([60e9, 2e9], per_round=1, cores=8, core=core) == pytest.approx(2.0)  # one device, one core
    # three at once on two cores (one left beside the edge and the server): their sum must fit one core
    assert time_scale([60e9, 60e9, 15e9, 2e9], per_round=3, cores=2, core=core) == pytest.approx(135 / 30)


def test_a_testbed_runs_each_strategy_and_writes_measured_beside_simulated(tmp_path: Path) -> None:
    """A tiny fleet of three classes 30x apart, one round per strategy: testbed.json holds the host, the time
    scale, what emulated each resource (cgroups and network namespaces where this machine allows, else unshaped or
    link-layer shaping, said so), and per round the measured and simulated latency; the page and its figure are
    written, and no namespace is left behind."""
    config = tmp_path / "testbed.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tb", "seed": 0, "meter": False, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "synthetic_train": 120, "synthetic_test": 40},
        "model": {"name": "cnn", "width": 0.25},
        "fleet": {"devices": 3, "classes": {"wearable": 0.34, "phone-mid": 0.33, "jetson-nano": 0.33}},
        "training": {"rounds": 1, "devices_per_round": 2, "local_steps": 2, "batch_size": 8},
    }))
    out = tmp_path / "testbed"
    done = subprocess.run([sys.executable, "-m", "smartsplit", "testbed", str(config), "--out", str(out),
                           "--strategies", "smartsplit,fedavg", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "testbed.json").read_text())
    assert {"cpu", "cores", "kernel", "root", "core_gflops"} <= set(result["host"]) and result["host"]["core_gflops"] > 0
    assert result["time_scale"] >= 1.0
    cpu, memory = cpu_quota_unavailable(), enforcement_unavailable()
    assert result["emulation"]["cpu"].startswith("cgroup" if cpu is None else "unshaped")
    assert result["emulation"]["memory"].startswith("cgroup" if memory is None else "unshaped")
    network = network_unavailable()
    assert result["emulation"]["network"].startswith("a veth pair" if network is None else "link-layer token bucket")
    assert set(result["strategies"]) == {"smartsplit", "fedavg"}
    for name, data in result["strategies"].items():
        (only,) = data["rounds"]
        assert only["round"] == 1 and only["participants"] >= 1
        assert only["measured_s"] > 0 and only["simulated_s"] > 0
        assert data["peak_measured_s"] == only["measured_s"] and data["peak_simulated_s"] == only["simulated_s"]
        assert 0 <= data["accuracy"] <= 1
        assert json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])["clock"] == "measured"
    assert (out / "testbed.png").stat().st_size > 0 and "measured against simulated" in (out / "testbed.md").read_text()
    assert "smartsplit" in done.stdout and "median |m/s-1|" in done.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True) if network is None else None
    assert left is None or "ss-" not in left.stdout


NETWORK_UNAVAILABLE = network_unavailable()

RECEIVER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
started = time.monotonic()
s.sendall(b"x" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
s.recv(1)
up = time.monotonic() - started
started, got = time.monotonic(), 0
while got < int(sys.argv[3]):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += len(chunk)
print(up, time.monotonic() - started, got)
"""


@pytest.mark.skipif(NETWORK_UNAVAILABLE is not None, reason=NETWORK_UNAVAILABLE or "")
def test_a_device_namespace_holds_its_link_to_the_class_bandwidth_each_way() -> None:
    """400 KB each way through a namespace shaped at 400 KB/s up and 200 KB/s down takes about 1 s and 2 s (tbf
    counts the TCP/IP headers too: a few percent more)."""
    import socket

    from smartsplit.deploy.netns import device_network

    size = 400_000
    net = device_network(7, 400e3, 200e3, "test")
    try:
        server = socket.socket()
        server.bind((net.host_ip, 0))
        server.listen(1)
        child = subprocess.Popen(net.wrap([sys.executable, "-c", RECEIVER, net.host_ip, str(server.getsockname()[1]),
                                           str(size)]), stdout=subprocess.PIPE, text=True)
        conn, _ = server.accept()
        got = 0
        while got < size:
            got += len(conn.recv(65536))
        conn.sendall(b"k" + b"y" * size)
        conn.close()
        up, down, received = child.communicate(timeout=60)[0].split()
    finally:
        net.remove()
    assert int(received) >= size - 1
    assert 0.95 <= float(up) <= 1.5 and 1.9 <= float(down) <= 3.0, (up, down)
