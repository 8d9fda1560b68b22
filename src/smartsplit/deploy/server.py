"""The central server process: the global model, the strategy and the run folder; rounds train on the edges.

It runs the same experiment loop as ``smartsplit run`` (the same run folder: metrics.jsonl, decisions.jsonl,
state.pt, report), except that a round's training happens on the edge servers, each with its devices: the
server hands each edge its work (``NextRound``: the edge's instructions, its devices' instructions, their
hardware and availability, the round's clock) and waits for every edge's result (``FinishRound``: updates,
device results, faults, the bytes that crossed). An edge that restarts registers again and is handed its
unfinished round again; a server that restarts with ``--resume`` continues after the last round it saved,
and the edges, which keep retrying, carry on with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from smartsplit.config import Config
from smartsplit.deploy import smartsplit_pb2_grpc as rpc
from smartsplit.deploy.link import peer_identity, start_server
from smartsplit.deploy.wire import decode, encode, plain
from smartsplit.engine.round import RoundOutcome
from smartsplit.reports.summary import RunSummary
from smartsplit.runtime.embedded import run_experiment

log = logging.getLogger(__name__)

POLL_S = 20.0  # how long a NextRound call waits before telling the edge to ask again


class CentralService(rpc.CentralServicer):
    """The edges' side of the central server, and the executor that hands rounds to them."""

    def __init__(self, num_edges: int) -> None:
        self.num_edges = num_edges
        self.experiment = None
        self.work: dict[int, dict] = {}  # edge -> its work of the round under way
        self.results: dict[int, dict] = {}
        self.registered: set[int] = set()
        self.faults: Counter = Counter()  # since the last round ended
        self.done = False
        self.said_done: set[int] = set()
        self._changed = threading.Condition()

    def _edge(self, context) -> int:
        identity = peer_identity(context) or ""
        prefix, _, number = identity.partition("-")
        if prefix != "edge" or not number.isdigit() or int(number) >= self.num_edges:
            log.warning("refused a call from %s (identity %r): not one of the %d edge servers of this run",
                        context.peer(), identity, self.num_edges)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{identity!r} is not an edge server of this run (edge-0 .. edge-{self.num_edges - 1})")
        return int(number)

    def Register(self, request, context):
        edge = self._edge(context)
        with self._changed:
            if not self._changed.wait_for(lambda: self.experiment is not None, timeout=POLL_S):
                context.abort(grpc.StatusCode.UNAVAILABLE, "the run is still starting; try again")
            if edge in self.registered:
                self.faults["edge_rejoins"] += 1
                log.warning("edge-%d registered again (restarted?): it is handed its unfinished round again", edge)
            self.registered.add(edge)
            x = self.experiment
        devices = {d.id: {"device": plain(d), "shard": x.shards[d.id], "trace": plain(x.traces[d.id])}
                   for d in x.devices if x.central.edge_of(d.id) == edge}
        log.info("edge-%d registered from %s, %d devices", edge, context.peer(), len(devices))
        return encode("welcome", {
            "edge": edge, "config": x.config.to_yaml(), "profile": plain(x.profile),
            "spec": plain(x.edge_specs[edge]), "optimizer": plain(x.optimizer), "input_shape": tuple(x.train.shape), "num_classes": x.train.num_classes,
            "devices": devices,
        })

    def NextRound(self, request, context):
        edge = self._edge(context)
        with self._changed:
            ready = lambda: self.done or (edge in self.work and edge not in self.results)  # noqa: E731
            if not self._changed.wait_for(ready, timeout=POLL_S):
                return encode("wait")
            if edge in self.work and edge not in self.results:
                return encode("round", self.work[edge])
            self.said_done.add(edge)
            self._changed.notify_all()
            return encode("done")

    def FinishRound(self, request, context):
        edge = self._edge(context)
        _, result = decode(request)
        with self._changed:
            work = self.work.get(edge)
            if work is None or work["round"] != result["round"] or edge in self.results:
                return encode("stale")  # a round handed out before the server restarted, or delivered twice
            self.results[edge] = result
            self._changed.notify_all()
        return encode("ok")

    # ---- the executor the experiment calls for each round

    def __call__(self, experiment, device_instructions, edge_instructions, observer) -> RoundOutcome:
        x = experiment
        by_edge: dict[int, list] = {e: [] for e in range(self.num_edges)}
        for instructions in device_instructions:
            d = instructions.device_id
            by_edge[x.central.edge_of(d)].append((instructions, plain(x.devices[d]), plain(x.availability[d])))
        with self._changed:
            self.experiment = x
            self.results = {}
            self.work = {
                e: {"round": edge_instructions[e].round, "edge": edge_instructions[e], "devices": by_edge[e],
                    "start_s": x.clock_s, "deadline_s": x.config.training.round_deadline_s,
                    "options": plain(x.strategy.execution), "observe": observer is not None}
                for e in range(self.num_edges)
            }
            self._changed.notify_all()
            waited = time.monotonic()
            while len(self.results) < self.num_edges:
                self._changed.wait(timeout=5.0)
                if time.monotonic() - waited > 60:
                    missing = sorted(set(range(self.num_edges)) - set(self.results))
                    log.warning("round %d: still waiting for edge servers %s", edge_instructions[0].round + 1, missing)
                    waited = time.monotonic()
            results, self.work = self.results, {}
            faults, self.faults = self.faults, Counter()
        wire: Counter = Counter()
        for e in range(self.num_edges):
            faults.update(results[e]["faults"])
            wire.update(results[e]["wire"])
        merged = sorted((r for e in range(self.num_edges) for r in results[e]["results"]), key=lambda r: r.report.device)
        for kind, count in sorted(faults.items()):
            log.warning("round %d: %d %s", edge_instructions[0].round + 1, count, kind.replace("_", " "))
        return RoundOutcome([results[e]["updates"] for e in range(self.num_edges)], merged, dict(faults), dict(wire))

    def finish(self, wait_s: float = 15.0) -> None:
        """The run is over: tell every edge that asks, waiting a while for the registered ones to hear it."""
        with self._changed:
            self.done = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.registered <= self.said_done, timeout=wait_s)


def run_server(config: Config, listen: str, certs: Path | None, run_dir: Path | None = None, *, resume: bool = False,
               overwrite: bool = False, progress: bool = True) -> RunSummary:
    """Serve ``config``'s run on ``listen`` until every round is done; returns its summary."""
    service = CentralService(len(config.edge.speeds()))
    server, port = start_server([lambda s: rpc.add_CentralServicer_to_server(service, s)], listen, certs, "server")
    log.info("central server listening on port %d for %d edge servers", port, service.num_edges)
    try:
        return run_experiment(config, run_dir, progress=progress, resume=resume, overwrite=overwrite, executor=service)
    finally:
        service.finish()
        server.stop(grace=2.0)
