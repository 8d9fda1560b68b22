"""A deployment among peers that do not trust each other: a device or an edge that lies costs itself only.

Each test runs a real deployment on loopback (server, edge and device processes, mutual TLS) with one attacker
holding a valid certificate (``adversary.py``), and asserts that the honest part of every round completes, the
attacker is reported with the fault its attack deserves, and no honest process exits early.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="the deployment needs grpcio: pip install 'smartsplit[deploy]'")
pytest.importorskip("cryptography", reason="the deployment needs cryptography: pip install 'smartsplit[deploy]'")

from adversary import ATTACKS  # noqa: E402
from test_deploy import records, start, write_config  # noqa: E402

from smartsplit.deploy import smartsplit_pb2_grpc as rpc  # noqa: E402
from smartsplit.deploy.certs import write_certs  # noqa: E402
from smartsplit.deploy.launch import free_port  # noqa: E402
from smartsplit.deploy.link import claimed, open_channel  # noqa: E402
from smartsplit.deploy.wire import decode, encode  # noqa: E402

HERE = Path(__file__).resolve().parent


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_device_that_lies_is_dropped_and_the_honest_devices_finish_every_round(tmp_path):
    attacks = list(ATTACKS)  # one per round
    config = write_config(tmp_path, meter=False, strategy={"name": "splitfed-v2"}, fleet={"devices": 3},
                          edge={"servers": 1}, training={"rounds": len(attacks), "devices_per_round": 3,
                                                         "local_steps": 2})
    certs = tmp_path / "certs"
    write_certs(certs, devices=3, edges=1)
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    secured = ["--certs", str(certs)]
    server = start("server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), *secured,
                   log=tmp_path / "server.log")
    honest = [
        start("edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
              "--timeout", "30", "--connect-timeout", "30", *secured, log=tmp_path / "edge.log"),
        *(start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", str(d), "--no-meter", *secured,
                log=tmp_path / f"device-{d}.log") for d in (0, 1)),
    ]
    attacker = subprocess.Popen([sys.executable, str(HERE / "adversary.py"), "device", f"127.0.0.1:{edge_port}",
                                 str(certs), "2", ",".join(attacks)], stdout=open(tmp_path / "attacker.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for p in honest:  # they end when the run does, not before
            assert p.wait(timeout=60) == 0, [(tmp_path / n).read_text()[-2000:] for n in ("edge.log", "device-0.log")]
    finally:
        _stop([server, *honest, attacker])
    edge_log = (tmp_path / "edge.log").read_text()
    rounds = records(run)
    assert len(rounds) == len(attacks)
    for record, attack in zip(rounds, attacks):
        expected = ATTACKS[attack][1]
        assert record["faults"] == {expected: 1}, (attack, record["faults"], edge_log[-3000:])
        by_device = {d["device"]: d for d in record["devices"]}
        assert by_device[2]["dropped_out"], attack
        for d in (0, 1):
            assert not by_device[d]["dropped_out"] and by_device[d]["steps"] == 2, (attack, by_device[d])
        if record["loss"] is not None:
            assert math.isfinite(record["loss"]) and math.isfinite(record["accuracy"]), attack  # nothing poisoned
    assert edge_log.count("device 2's") >= len(attacks)  # each refusal logged with the reason
    assert "holds NaN or infinite values" in edge_log and "names device 1, but the sender is device 2" in edge_log
    assert "Traceback" not in edge_log


class _LyingEdge(threading.Thread):
    """An edge server (edge-1's certificate) that registers and takes its rounds, then answers round 1 with a
    result that would crash aggregation, and round 2 not at all."""

    def __init__(self, address: str, certs: Path) -> None:
        super().__init__(daemon=True)
        self.address, self.certs, self.error = address, certs, None

    def run(self) -> None:
        try:
            with open_channel(self.address, self.certs, "edge-1") as channel:
                central, meta = rpc.CentralStub(channel), claimed("edge-1")
                central.Register(encode("register", {"edge": "edge-1"}), metadata=meta, timeout=120,
                                 wait_for_ready=True)  # the server may still be starting
                while True:
                    kind, work = decode(central.NextRound(encode("next", {"edge": "edge-1"}), metadata=meta, timeout=60))
                    if kind == "done":
                        return
                    if kind == "round" and work["round"] == 0:
                        from smartsplit.messages import Update
                        import torch

                        bad = Update({1: {"0.weight": torch.zeros(3)}}, {1: 10})  # a flattened, wrong weight
                        central.FinishRound(encode("result", {"round": 0, "edge": 1, "updates": [bad], "results": [],
                                                              "faults": {}, "wire": {}, "wall_s": 1.0}),
                                            metadata=meta, timeout=60)
                    # round 1 and after: silent; the server's edge deadline must close the round without it
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_an_edge_that_lies_or_goes_silent_loses_its_part_and_the_other_edge_finishes(tmp_path):
    config = write_config(tmp_path, meter=False, strategy={"name": "fedavg"}, fleet={"devices": 4},
                          edge={"servers": 2}, training={"rounds": 2, "devices_per_round": 4, "local_steps": 2})
    certs = tmp_path / "certs"
    write_certs(certs, devices=4, edges=2)
    run, port, edge_port = tmp_path / "run", free_port(), free_port()
    secured = ["--certs", str(certs)]
    server = start("server", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(run), "--edge-timeout", "20",
                   *secured, log=tmp_path / "server.log")
    honest = [start("edge", "--server", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{edge_port}", "--name", "edge-0",
                    "--timeout", "30", "--connect-timeout", "30", *secured, log=tmp_path / "edge.log")]
    honest += [start("device", "--edge", f"127.0.0.1:{edge_port}", "--id", str(d), "--no-meter", *secured,
                     log=tmp_path / f"device-{d}.log") for d in range(4)]  # those assigned elsewhere are refused
    liar = _LyingEdge(f"127.0.0.1:{port}", certs)
    liar.start()
    try:
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert honest[0].wait(timeout=60) == 0
    finally:
        _stop([server, *honest])
    assert liar.error is None, liar.error
    rounds = records(run)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["faults"]["edge_malformed"] == 1 and rounds[1]["faults"]["edge_timeouts"] == 1
    for record in rounds:
        trained = [d for d in record["devices"] if not d["dropped_out"]]
        lost = [d for d in record["devices"] if d["dropped_out"]]
        assert trained and lost and all(d["steps"] == 2 for d in trained)  # edge-0's devices finished
        assert math.isfinite(record["loss"])
    server_log = (tmp_path / "server.log").read_text()
    assert "refused edge-1's result" in server_log and "edge-1 sent no result within 20 s" in server_log


def test_a_device_refuses_what_a_lying_edge_sends_and_applies_none_of_it(tmp_path, caplog):
    """Weights for units past the cut, instructions or gradients for another device, a NaN or misshapen
    gradient, an unknown call: each is refused with a logged reason before the device role sees any of it."""
    import dataclasses

    import torch
    import yaml

    from smartsplit.config import build_config
    from smartsplit.deploy.device import DeviceOptions, _answer, _Device
    from smartsplit.deploy.edge import device_view
    from smartsplit.deploy.wire import plain
    from smartsplit.engine.experiment import Experiment
    from smartsplit.messages import Gradient

    config = build_config(yaml.safe_load(write_config(
        tmp_path, meter=False, strategy={"name": "splitfed-v2"}, fleet={"devices": 2}, edge={"servers": 1},
        training={"devices_per_round": 2}).read_text()))
    x = Experiment(config)
    me = _Device(0, DeviceOptions())
    me.welcome({"config": device_view(config), "optimizer": plain(x.optimizer), "device": plain(x.devices[0]),
                "trace": plain(x.traces[0]), "x": x.train.x[x.shards[0]], "y": x.train.y[x.shards[0]],
                "num_classes": x.train.num_classes, "sketch": None})
    plan = x.central.plan_round(0, x.candidates(), 2)
    mine = next(i for i in x.central.instructions(0, plan, 0.0)[0] if i.device_id == 0)

    def answer(method, **args):
        return decode(_answer(me, "device-0", method, args))

    beyond = {**mine.weights, mine.cut + 1: mine.weights[1]}
    for lie in (dataclasses.replace(mine, weights=beyond), dataclasses.replace(mine, device_id=1),
                dataclasses.replace(mine, weights={1: {k: v.flatten() for k, v in mine.weights[1].items()}})):
        assert answer("start_round", instructions=lie, observe=False)[0] == "error"
        assert me.role._round is None  # nothing of it was loaded
    assert answer("start_round", instructions=mine, observe=False)[0] == "reply"
    assert answer("plan_step", clock=0.0)[0] == "reply" and answer("begin_step", step=0)[0] == "reply"
    kind, reply = answer("forward", micro_batch=0)
    activation = reply["activation"]
    units = me.role._round.units
    for lie in (Gradient(0, 0, 0, torch.full_like(activation.tensor, float("nan")), 0.1),
                Gradient(0, 0, 0, activation.tensor.flatten(), 0.1), Gradient(1, 0, 0, activation.tensor, 0.1),
                Gradient(0, 1, 0, activation.tensor, 0.1)):
        assert answer("backward", gradient=lie)[0] == "error"
        assert all(p.grad is None for p in units.parameters())  # no gradient reached the device's units
    assert answer("format_disk")[0] == "error"
    refusals = [r.getMessage() for r in caplog.records if "not in good form" in r.getMessage()]
    assert len(refusals) == 8 and any("holds NaN" in m for m in refusals) and any("names device 1" in m for m in refusals)
    assert answer("backward", gradient=Gradient(0, 0, 0, torch.ones_like(activation.tensor), 0.1))[0] == "reply"
    assert any(p.grad is not None for p in units.parameters())  # the well-formed one is applied
