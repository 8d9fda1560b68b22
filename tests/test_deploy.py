"""The deployment: roles as processes over gRPC with mutual TLS, on loopback.

A ``launch --local`` run must train exactly what the embedded engine trains (the edges pace their devices on the
simulated clock), count on the wire the bytes the simulator counts, survive a device killed mid-round and a
central server restarted mid-run, and refuse devices that cannot prove who they are.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

grpc = pytest.importorskip("grpc", reason="the deployment needs grpcio: pip install 'smartsplit[deploy]'")
pytest.importorskip("cryptography", reason="the deployment needs cryptography: pip install 'smartsplit[deploy]'")

from smartsplit.deploy import smartsplit_pb2 as pb  # noqa: E402
from smartsplit.deploy import smartsplit_pb2_grpc as rpc  # noqa: E402
from smartsplit.deploy.certs import issue, load_identity, write_certs  # noqa: E402
from smartsplit.deploy.device import DeviceOptions, run_device  # noqa: E402
from smartsplit.deploy.edge import EdgeService  # noqa: E402
from smartsplit.deploy.launch import free_port  # noqa: E402
from smartsplit.deploy.link import claimed, open_channel, start_server  # noqa: E402
from smartsplit.deploy.wire import Reassembly, WireError, decode, encode, frames, plain, tensor_bytes, typed  # noqa: E402
from smartsplit.errors import SmartSplitError  # noqa: E402
from smartsplit.fleet import constant_trace  # noqa: E402
from smartsplit.records import DeviceReport  # noqa: E402
from smartsplit.roles.device import SimulatedTimes  # noqa: E402
from smartsplit.messages import Activation, DeviceResult, RoundInstructions, UnitHandoff, Update  # noqa: E402

TINY = {
    "name": "tiny", "seed": 3, "meter": True,
    "data": {"dataset": "synthetic", "synthetic_train": 240, "synthetic_test": 60},
    "model": {"name": "cnn", "width": 0.25},
    "fleet": {"devices": 4, "classes": {"phone-entry": 1.0}},
    "training": {"rounds": 2, "devices_per_round": 4, "local_steps": 3, "batch_size": 16,
                 # the engines agree bit for bit where no steps are grouped (engine.grouping): pinned,
                 # whatever this machine's timing of grouped steps would choose
                 "grouping": "never"},
    "strategy": {"name": "smartsplit"},
    "edge": {"servers": 2},
}
# figures the device measures on its own real steps, where the embedded engine asks its meter's child process
MEASURED = {"peak_measured_mb", "peak_measured_by", "oom_events"}
DEPLOYED_ONLY = {"wall_s", "faults", "wire"}


def write_config(folder: Path, **changes) -> Path:
    config = {**TINY, "output_dir": str(folder / "runs")}
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartsplit.cli", *args], capture_output=True, text=True, timeout=timeout)


def start(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smartsplit.cli", *args], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def comparable(record: dict, skip: set[str]) -> dict:
    out = {k: v for k, v in record.items() if k not in skip}
    out["devices"] = [{k: v for k, v in d.items() if k not in skip} for d in record["devices"]]
    return out


def alike(a, b, rel: float) -> bool:
    """Equal, floats within ``rel`` (relative), in nested dicts and lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(alike(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(alike(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=rel)
    return a == b


# channels-last: the same within rounding, not bit for bit (the wire carries tensors contiguous, and each process
# lays them out again; where torch's kernels meet a tensor in another layout they round differently, 1e-7 apart)
@pytest.mark.parametrize("memory_format, rel", [("contiguous", 0.0), ("channels_last", 1e-5)])
def test_launch_local_trains_what_the_embedded_engine_trains_and_counts_its_bytes(tmp_path, memory_format, rel):
    config = write_config(tmp_path, memory_format=memory_format)
    embedded = cli("run", str(config), "--out", str(tmp_path / "embedded"), "--quiet")
    assert embedded.returncode == 0, embedded.stderr
    launched = cli("launch", str(config), "--local", "--out", str(tmp_path / "deployed"), "--quiet")
    assert launched.returncode == 0, launched.stderr + "\n".join(
        p.read_text() for p in sorted((tmp_path / "deployed" / "logs").glob("*.log")))

    ours, theirs = records(tmp_path / "embedded"), records(tmp_path / "deployed")
    assert len(ours) == len(theirs) == 2
    skip = MEASURED | DEPLOYED_ONLY
    for a, b in zip(ours, theirs):  # accuracy, loss, cuts, simulated times, bytes: exactly (contiguous)
        assert comparable(a, skip) == comparable(b, skip) if not rel else alike(comparable(a, skip), comparable(b, skip), rel)
    decisions = [(tmp_path / run / "decisions.jsonl").read_text() for run in ("embedded", "deployed")]
    assert decisions[0] == decisions[1] if not rel else alike(
        *[[json.loads(line) for line in text.splitlines()] for text in decisions], rel)
    for record in theirs:
        wire = record["wire"]
        # the tensors that crossed are the simulator's bytes: model down and up, activations up, gradients down
        assert wire["model_down"] + wire["gradients_down"] == record["bytes_down"] > 0
        assert wire["activations_up"] + wire["model_up"] == record["bytes_up"] > 0
        assert wire["frames_up"] > wire["activations_up"] + wire["labels_up"] + wire["model_up"]  # plus framing, reports
        assert "faults" not in record  # nothing went wrong
        # each device measured its own real steps with the heap counter preloaded into its process
        assert all(d["peak_measured_mb"] and d["peak_measured_mb"] > 0 for d in record["devices"])
    logs = {p.name for p in (tmp_path / "deployed" / "logs").iterdir()}
    assert logs == {"server.log", "edge-0.log", "edge-1.log", *(f"device-{d}.log" for d in range(4))}
    assert (tmp_path / "deployed" / "certs" / "ca.pem").exists()


def test_a_device_killed_mid_round_drops_out_and_the_run_completes(tmp_path):
    config = write_config(tmp_path, meter=False, training={"rounds": 3, "local_steps": 60, "devices_per_round": 2},
                          fleet={"devices": 2}, edge={"servers": 1})
    certs = tmp_path / "certs"
    write_certs(certs, devices=2, edges=1)
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    secured = ["--certs", str(certs)]
    processes = [
        start("server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), *secured, log=tmp_path / "server.log"),
        start("edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
              "--timeout", "10", "--connect-timeout", "5", "--verbose", *secured, log=tmp_path / "edge.log"),
    ]
    victim = start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", "1", "--no-meter", *secured, log=tmp_path / "d1.log")
    processes += [victim, start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", "0", "--no-meter", *secured,
                                log=tmp_path / "d0.log")]
    try:
        deadline = time.monotonic() + 120
        while "device 1: step 5 done" not in (tmp_path / "edge.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)  # mid-round: 5 of its 60 steps done
        assert processes[0].wait(timeout=180) == 0, (tmp_path / "server.log").read_text()
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    rounds = records(run)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    first = rounds[0]
    assert first["faults"] == {"device_disconnects": 1}
    gone = next(d for d in first["devices"] if d["device"] == 1)
    assert gone["dropped_out"] and 0 < gone["steps"] < 60
    kept = next(d for d in first["devices"] if d["device"] == 0)
    assert kept["steps"] == 60 and not kept["dropped_out"]
    assert all(r["faults"] == {"device_absent": 1} for r in rounds[1:])  # it never came back
    assert "device 1 disconnected; it drops out of the round" in (tmp_path / "edge.log").read_text()


def test_a_restarted_server_resumes_and_the_run_matches_an_uninterrupted_one(tmp_path):
    config = write_config(tmp_path, meter=False, training={"rounds": 4, "local_steps": 20, "devices_per_round": 2},
                          fleet={"devices": 2}, edge={"servers": 1})
    embedded = cli("run", str(config), "--out", str(tmp_path / "embedded"), "--quiet")
    assert embedded.returncode == 0, embedded.stderr
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    server_args = ["server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), "--insecure"]
    server = start(*server_args, log=tmp_path / "server.log")
    others = [start("edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
                    "--insecure", log=tmp_path / "edge.log")]
    others += [start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", str(d), "--no-meter", "--insecure",
                     log=tmp_path / f"d{d}.log") for d in range(2)]
    restarted = None
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").exists() and records(run)) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)  # mid-run: round 2 is under way on the edge
        server.wait()
        assert len(records(run)) < 4
        restarted = start(*server_args, "--resume", log=tmp_path / "server.log")
        assert restarted.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()
    finally:
        for p in [server, *others, *([restarted] if restarted else [])]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    ours, theirs = records(tmp_path / "embedded"), records(run)
    assert [r["round"] for r in theirs] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert comparable(a, DEPLOYED_ONLY) == comparable(b, DEPLOYED_ONLY)
    assert "INSECURE" in (tmp_path / "edge.log").read_text()


@pytest.fixture
def edge_for_device_0(tmp_path):
    """An edge server that device 0 (only) is assigned to, its certificates, and a second, unrelated authority."""
    write_certs(tmp_path / "ours", devices=3, edges=1)
    write_certs(tmp_path / "theirs", devices=3, edges=1)
    service = EdgeService({0: {}}, {}, {0: []}, 1 << 20)
    server, port = start_server([lambda s: rpc.add_EdgeServicer_to_server(service, s)], "127.0.0.1:0",
                                tmp_path / "ours", "edge-0", unary=False)
    yield f"localhost:{port}", tmp_path, service
    server.stop(grace=None)


def say_hello(address: str, certs: Path, name: str, device: int):
    with open_channel(address, certs, name, unary=False) as channel:
        replies = rpc.EdgeStub(channel).Session(frames(encode("hello", {"device": device})), metadata=claimed(name),
                                                timeout=5)
        return next(iter(replies))


def test_the_edge_refuses_a_device_with_another_devices_identity_or_not_assigned_to_it(edge_for_device_0, caplog):
    address, folder, service = edge_for_device_0
    with pytest.raises(grpc.RpcError) as refused:
        say_hello(address, folder / "ours", "device-1", device=0)  # device 1's certificate, claiming to be device 0
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "refused by the edge server (its log says why)"  # the reason stays here
    with pytest.raises(SmartSplitError, match="refused device-2: refused by the edge server"):
        run_device(address, 2, folder / "ours", DeviceOptions(retry_s=5))
    assert service.refusals == 2
    refusals = [r.getMessage() for r in caplog.records if "refused a device connection" in r.getMessage()]
    assert len(refusals) == 2 and all("(identity 'device-" in m and "not a device assigned" in m for m in refusals)
    assert isinstance(say_hello(address, folder / "ours", "device-0", device=0), pb.Frame)  # the real device 0 gets in


def test_tls_refuses_no_certificate_another_authority_and_an_expired_certificate(edge_for_device_0, capfd):
    address, folder, service = edge_for_device_0
    port = address.rsplit(":", 1)[1]
    ours = load_identity(folder / "ours", "device-0")
    theirs = load_identity(folder / "theirs", "device-0")
    issue(folder / "ours", "device-1", days=1, not_before=__import__("datetime").datetime(2020, 1, 1))
    expired = load_identity(folder / "ours", "device-1")
    attempts = {
        "no certificate": grpc.ssl_channel_credentials(root_certificates=ours.authority),
        "another authority": grpc.ssl_channel_credentials(ours.authority, theirs.key, theirs.certificate),
        "expired": grpc.ssl_channel_credentials(ours.authority, expired.key, expired.certificate),
    }
    for why, credentials in attempts.items():
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(rpc.EdgeStub(channel).Session(frames(encode("hello", {"device": 0})), timeout=5)))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, why
    assert service.refusals == 0  # refused in the handshake: none of them reached SmartSplit's code
    logged = capfd.readouterr().err
    assert logged.count("Handshake failed") >= 2, logged  # gRPC logs the server's refusals on its stderr


def test_messages_cross_the_wire_unchanged_and_only_as_data():
    weights = {1: {"0.weight": torch.randn(4, 1, 3, 3), "0.bias": torch.zeros(4)}, 2: {"w": torch.randn(2, 2).double()}}
    report = DeviceReport(device=3, device_class="phone", cut=2, final_cut=1, budget_mb=1.5, peak_predicted_mb=0.1,
                          peak_measured_mb=None, held_mb=0.05, micro_batches=[8, 16], oom_events=0, replans=1, cut_moves=1, pauses=0,
                          dropped_out=False, steps=3, samples=48, loss=0.1 + 0.2, loss_rms=None, **vars(SimulatedTimes()))
    sent = {
        "instructions": RoundInstructions(1, 3, 2, weights, True, True, False, (7, 1, 3), 1e-300),
        "activation": Activation(3, 0, 1, True, torch.randn(8, 4, 13, 13), torch.arange(8), 16),
        "handoff": UnitHandoff(3, {2: weights[2]}, {2: {"w": {"momentum_buffer": torch.ones(2, 2)}}}),
        "result": DeviceResult(Update(weights, {1: 48, 2: 48}), report, [(0, 1, np.arange(5.0))]),
        "odd": [torch.empty(0, 3), torch.tensor([True, False]), torch.randn(3).half(), torch.randn(2).bfloat16()],
    }
    payload = pb.Payload.FromString(encode("test", sent).SerializeToString())
    assembly, whole = Reassembly(1 << 30), None
    for frame in frames(payload, chunk=1000):
        assert len(frame.chunk) <= 1000
        whole = assembly.add(frame) or whole
    kind, got = decode(whole)
    assert kind == "test"
    assert got["instructions"].batch_seed == (7, 1, 3) and got["instructions"].start_s == 1e-300
    assert list(got["instructions"].weights) == [1, 2]  # int keys stay ints
    for unit, state in weights.items():
        for name, tensor in state.items():
            assert torch.equal(got["instructions"].weights[unit][name], tensor)
            assert got["instructions"].weights[unit][name].dtype == tensor.dtype
    assert torch.equal(got["activation"].tensor, sent["activation"].tensor)
    assert got["result"].report == report and got["result"].report.loss == 0.1 + 0.2
    assert np.array_equal(got["result"].observations[0][2], np.arange(5.0))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got["odd"], sent["odd"]))
    activation = sent["activation"]
    assert tensor_bytes(encode("a", activation)) == activation.tensor.nbytes + activation.labels.nbytes


def test_a_payload_cannot_name_a_type_outside_the_messages():
    evil = pb.Payload(kind="call", body=json.dumps({"$dc": "Popen", "fields": {"args": ["rm", "-rf", "/"]}}))
    with pytest.raises(WireError, match="unknown message type 'Popen'"):
        decode(evil)
    with pytest.raises(WireError, match="cannot travel"):
        encode("x", {"trace": constant_trace})  # a function is code, not data
    with pytest.raises(WireError, match="could not be read"):
        decode(pb.Payload(kind="call", body="{not json"))


def test_plans_profiles_and_traces_cross_as_plain_data_and_arrive_typed():
    from smartsplit.fleet import BudgetTrace, Device
    from smartsplit.memory.model import MemoryBreakdown
    from smartsplit.memory.ondevice import DevicePlan

    plan = DevicePlan(cut=3, micro_batch=8, segments=((1, 2),), memory=MemoryBreakdown(10, 2, 30, 4, 5, 1, "forward 3"),
                      held_bytes=25, recompute_flops=1000, compute_s=0.5, recompute_s=0.125, round_trips=2)
    trace = BudgetTrace((0.0, 5.0), (1 << 20, 1 << 19))
    device = Device(7, "phone", 1 << 30, 2e9, 1e6, 2e6)
    with pytest.raises(WireError, match="DevicePlan cannot travel"):
        encode("reply", {"plan": plan})  # a record crosses as plain data, never as an object the peer names
    _, got = decode(pb.Payload.FromString(encode("reply", {"plan": plain(plan), "trace": plain(trace),
                                                           "device": plain(device)}).SerializeToString()))
    assert typed(DevicePlan, got["plan"], "the plan") == plan and typed(DevicePlan, got["plan"], "p").segments == ((1, 2),)
    assert typed(BudgetTrace, got["trace"], "the trace") == trace and typed(Device, got["device"], "the device") == device
    wrong = dict(got["plan"], micro_batch="8")
    with pytest.raises(WireError, match=r"the plan\.micro_batch: expected int, got str"):
        typed(DevicePlan, wrong, "the plan")
    nested = dict(got["plan"], memory=dict(got["plan"]["memory"], static=[1]))
    with pytest.raises(WireError, match=r"the plan\.memory\.static: expected int, got list"):
        typed(DevicePlan, nested, "the plan")
    with pytest.raises(WireError, match="unknown fields \\['shell'\\]"):
        typed(Device, dict(got["device"], shell="rm -rf /"), "the device")
    with pytest.raises(WireError, match="the trace: not a valid BudgetTrace"):
        typed(BudgetTrace, {"times_s": [0.0, 5.0], "budgets_bytes": [1]}, "the trace")


def test_deployment_commands_explain_what_is_missing(tmp_path):
    out = cli("edge", "--server", "127.0.0.1:1", "--listen", "127.0.0.1:0")
    assert out.returncode == 2 and "give --certs DIR (made by: smartsplit certs DIR --devices N --edges M)" in out.stderr
    out = cli("device", "--edge", "127.0.0.1:1", "--id", "0", "--certs", str(tmp_path / "nowhere"), "--no-meter")
    assert out.returncode == 2 and "nowhere" in out.stderr and "smartsplit certs" in out.stderr
    out = cli("launch", str(write_config(tmp_path)))
    assert out.returncode == 2 and "needs --local" in out.stderr
    out = cli("certs", str(tmp_path / "certs"), "--devices", "2", "--edges", "1")
    assert out.returncode == 0 and (tmp_path / "certs" / "device-1.pem").exists()
    out = cli("certs", str(tmp_path / "certs"), "--devices", "2", "--edges", "1")
    assert out.returncode == 2 and "ca.pem" in out.stderr


def test_a_device_over_its_enforced_budget_is_killed_by_the_kernel_and_dropped(tmp_path):
    from smartsplit.deploy.limits import enforcement_unavailable

    reason = enforcement_unavailable()
    if reason is not None:
        pytest.skip(f"--enforce-budget cannot run here: {reason}")
    # fedavg trusts its plain plan whatever the budget says; 1 MB above the idle footprint cannot hold its step
    config = write_config(tmp_path, meter=False, strategy={"name": "fedavg"}, fleet={"devices": 1},
                          edge={"servers": 1}, model={"name": "cnn", "width": 1.0},
                          training={"rounds": 1, "devices_per_round": 1, "local_steps": 20, "batch_size": 128})
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    processes = [
        start("server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), "--insecure",
              log=tmp_path / "server.log"),
        start("edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
              "--insecure", log=tmp_path / "edge.log"),
    ]
    device = start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", "0", "--no-meter", "--insecure",
                   "--budget", str(2**20), "--enforce-budget", log=tmp_path / "device.log")
    try:
        assert device.wait(timeout=180) == -signal.SIGKILL, (tmp_path / "device.log").read_text()
        assert processes[0].wait(timeout=120) == 0, (tmp_path / "server.log").read_text()
    finally:
        for p in [*processes, device]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert "kernel memory limit" in (tmp_path / "device.log").read_text()
    (record,) = records(run)
    assert record["faults"] == {"device_disconnects": 1}
    assert record["devices"][0]["dropped_out"] and record["devices"][0]["steps"] == 0


def test_a_smartsplit_device_whose_enforced_budget_holds_no_plan_is_refused_by_its_planner(tmp_path):
    from smartsplit.deploy.limits import enforcement_unavailable

    reason = enforcement_unavailable()
    if reason is not None:
        pytest.skip(f"--enforce-budget cannot run here: {reason}")
    config = write_config(tmp_path, meter=False, strategy={"name": "smartsplit"}, fleet={"devices": 1},
                          edge={"servers": 1}, training={"rounds": 1, "devices_per_round": 1})
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    processes = [
        start("server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), "--insecure",
              log=tmp_path / "server.log"),
        start("edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
              "--insecure", "--connect-timeout", "20", log=tmp_path / "edge.log"),
    ]
    device = start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", "0", "--no-meter", "--insecure",
                   "--budget", "1024", "--enforce-budget", log=tmp_path / "device.log")
    try:
        assert device.wait(timeout=180) == 2, (tmp_path / "device.log").read_text()  # refused, not killed
        assert processes[0].wait(timeout=120) == 0, (tmp_path / "server.log").read_text()
    finally:
        for p in [*processes, device]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert "a budget of 0.0 MB holds no training plan at any cut" in (tmp_path / "device.log").read_text()
    (record,) = records(run)
    assert record["devices"][0]["dropped_out"] and record["devices"][0]["steps"] == 0


def test_an_edge_that_restarts_mid_round_rejoins_and_the_run_matches_an_uninterrupted_one(tmp_path):
    config = write_config(tmp_path, meter=False, training={"rounds": 3, "local_steps": 40, "devices_per_round": 2},
                          fleet={"devices": 2}, edge={"servers": 1})
    embedded = cli("run", str(config), "--out", str(tmp_path / "embedded"), "--quiet")
    assert embedded.returncode == 0, embedded.stderr
    certs = tmp_path / "certs"
    write_certs(certs, devices=2, edges=1)
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    secured = ["--certs", str(certs)]
    edge_args = ["edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
                 "--verbose", *secured]
    server = start("server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), *secured,
                   log=tmp_path / "server.log")
    edge = start(*edge_args, log=tmp_path / "edge.log")
    devices = [start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", str(d), "--no-meter", *secured,
                     log=tmp_path / f"d{d}.log") for d in range(2)]
    restarted = None
    try:
        deadline = time.monotonic() + 120
        while "device 0: step 10 done" not in (tmp_path / "edge.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(edge.pid, signal.SIGKILL)  # mid-round 1
        edge.wait()
        restarted = start(*edge_args, log=tmp_path / "edge-again.log")
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()
    finally:
        for p in [server, edge, *devices, *([restarted] if restarted else [])]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    ours, theirs = records(tmp_path / "embedded"), records(run)
    assert [r["round"] for r in theirs] == [1, 2, 3]
    assert theirs[0]["faults"] == {"edge_rejoins": 1} and all("faults" not in r for r in theirs[1:])
    for a, b in zip(ours, theirs):  # the round was handed out again and trained from its instructions again
        assert comparable(a, DEPLOYED_ONLY) == comparable(b, DEPLOYED_ONLY)
    assert "edge-0 registered again" in (tmp_path / "server.log").read_text()


def test_an_idle_device_stream_stays_up(tmp_path, monkeypatch):
    """Both ends ping an idle link and both accept the other's pings: gRPC's defaults answered a device's pings
    with GOAWAY too_many_pings, tearing idle streams down (here with pings every 0.4 s instead of 20 s)."""
    from smartsplit.deploy import link

    monkeypatch.setattr(link, "KEEPALIVE_MS", 400)
    write_certs(tmp_path, devices=1, edges=1)
    service = EdgeService({0: {}}, {}, {0: []}, 1 << 20)
    server, port = start_server([lambda s: rpc.add_EdgeServicer_to_server(service, s)], "127.0.0.1:0", tmp_path,
                                "edge-0", unary=False)
    received, ended = [], []
    try:
        with open_channel(f"127.0.0.1:{port}", tmp_path, "device-0", unary=False) as channel:
            replies = rpc.EdgeStub(channel).Session(frames(encode("hello", {"device": 0})), metadata=claimed("device-0"))

            def read():
                try:
                    received.extend(replies)
                except grpc.RpcError as exc:
                    ended.append(exc)

            reader = __import__("threading").Thread(target=read, daemon=True)
            reader.start()
            time.sleep(6.0)  # idle: fifteen keepalive intervals
            assert not ended, ended[0].details()
            service._links[0].close(encode("bye"))
            reader.join(timeout=10)
    finally:
        server.stop(grace=None)
    assert not ended and [decode(Reassembly(1 << 20).add(f))[0] for f in received[-1:]] == ["bye"]


def test_one_identity_cannot_hold_the_edge_and_silent_streams_time_out(tmp_path, monkeypatch):
    """Ten streams from one device that never say hello: two are admitted (and closed when the hello does not come),
    the rest refused at once, and an honest device still connects meanwhile."""
    from smartsplit.deploy import edge as edge_module

    monkeypatch.setattr(edge_module, "HELLO_S", 3.0)
    write_certs(tmp_path, devices=2, edges=1)
    service = EdgeService({0: {}, 1: {}}, {}, {0: [], 1: []}, 1 << 20)
    server, port = start_server([lambda s: rpc.add_EdgeServicer_to_server(service, s)], "127.0.0.1:0", tmp_path,
                                "edge-0", workers=2 * 2 + 8, unary=False)
    silent = __import__("queue").Queue()  # never yields: a stream that never says hello
    outcomes = []
    try:
        with open_channel(f"127.0.0.1:{port}", tmp_path, "device-0", unary=False) as channel:
            calls = [rpc.EdgeStub(channel).Session(iter(silent.get, None), metadata=claimed("device-0"), timeout=20)
                     for _ in range(10)]

            def finish(call):
                try:
                    next(iter(call))
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())

            readers = [__import__("threading").Thread(target=finish, args=(c,), daemon=True) for c in calls]
            for r in readers:
                r.start()
            time.sleep(1.0)
            assert isinstance(say_hello(f"127.0.0.1:{port}", tmp_path, "device-1", device=1), pb.Frame)  # let in
            for r in readers:
                r.join(timeout=15)
    finally:
        server.stop(grace=None)
    assert outcomes.count(grpc.StatusCode.PERMISSION_DENIED) == 8  # over the limit: refused before any read
    assert outcomes.count(grpc.StatusCode.CANCELLED) == 2  # admitted, then closed when no hello came in time


def test_a_device_is_told_only_what_it_needs_to_train(tmp_path):
    """The welcome's config has no seed, no partition settings and no fleet: with its own examples (not indices
    into a data set drawn with the seed), nothing lets a device recompute another device's data."""
    from smartsplit.config import build_config
    from smartsplit.deploy.edge import device_view

    config = build_config(yaml.safe_load(write_config(tmp_path, data={"partition": "shards", "shards_per_client": 3},
                                                      fleet={"devices": 4, "classes": {"phone-entry": 1.0}}).read_text()))
    view = yaml.safe_load(device_view(config))
    assert view["seed"] == 0 and config.seed == 3
    assert not {"partition", "alpha", "shards_per_client"} & set(view["data"])
    assert view["fleet"] == {"devices": 1, "budgets": {"resolution": config.fleet.budgets.resolution}}
    device = build_config(view)  # what the device builds from it
    assert (device.model, device.training.batch_size, device.edge.latency_s) == (
        config.model, config.training.batch_size, config.edge.latency_s)


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (a walk of the garbage collector's objects)."""
    import gc
    import warnings

    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on some of torch's lazy module objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for t in tensors:
        if not t.is_meta:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_a_deployed_devices_footprint_holds_no_model(tmp_path):
    """A device welcomed for a model 100x larger holds no more tensors once ready: it keeps the model's structure
    on the meta device, and builds, profiles and checks shapes without ever holding the model's weights."""
    from smartsplit.config import build_config
    from smartsplit.deploy.device import _Device
    from smartsplit.deploy.edge import device_view
    from smartsplit.deploy.checks import ModelShapes
    from smartsplit.fleet import Device
    from smartsplit.roles.device import OptimizerSpec

    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    growth, params = {}, {}
    for width in (0.25, 2.5):
        config = build_config(yaml.safe_load(write_config(tmp_path, meter=False, model={"name": "cnn", "width": width}).read_text()))
        info = {"config": device_view(config), "optimizer": plain(OptimizerSpec("sgd", 0.1, 0.0, 0)), "num_classes": 10,
                "sketch": None, "x": x, "y": y, "device": plain(Device(0, "phone-entry", 2**30, 1e9, 1e6, 1e6)),
                "trace": plain(constant_trace(2**30))}
        before = _live_tensor_bytes()
        device = _Device(0, DeviceOptions())
        device.welcome(info)
        growth[width] = _live_tensor_bytes() - before
        assert all(p.is_meta for p in device.architecture.parameters())
        params[width] = device.shapes.param_bytes
        assert isinstance(device.shapes, ModelShapes) and len(device.shapes.outputs) == len(device.architecture)
        del device
    assert params[2.5] > 10 * params[0.25] and params[2.5] > 4_000_000
    assert growth[2.5] - growth[0.25] < 0.01 * (params[2.5] - params[0.25]), (growth, params)


def test_a_free_running_deployment_measures_its_rounds_on_shaped_links(tmp_path):
    """``deployment.pace: free``: devices train at their own pace over links shaped to their class (a wearable's
    is slower than an entry phone's), the edge serves steps as they arrive, and the round's latency is measured by
    the wall clock. The links' emulated time is a floor under each device's measured round."""
    config = write_config(tmp_path, fleet={"devices": 4, "classes": {"phone-entry": 0.5, "wearable": 0.5}},
                          deployment={"pace": "free", "shape_links": True, "time_scale": 1.0}, meter=False)
    done = cli("launch", str(config), "--local", "--out", str(tmp_path / "free"), "--quiet")
    assert done.returncode == 0, done.stderr + "\n".join(
        p.read_text()[-3000:] for p in sorted((tmp_path / "free" / "logs").glob("*.log")))
    simulated = cli("run", str(config), "--out", str(tmp_path / "simulated"), "--quiet")
    assert simulated.returncode == 0, simulated.stderr
    free, sim = records(tmp_path / "free"), records(tmp_path / "simulated")
    assert len(free) == 2
    for measured, predicted in zip(free, sim):
        assert measured["participants"] == 4 and measured["dropouts"] == 0
        assert measured["latency_s"] == max(d["finish_s"] for d in measured["devices"]) > 0
        for d, p in zip(measured["devices"], predicted["devices"]):
            assert d["device"] == p["device"] and d["steps"] == p["steps"] == 3
            # the link's share of the simulated round (transfers and latencies) is paid for real, at least
            assert d["finish_s"] >= 0.9 * p["comm_s"], (d, p)
