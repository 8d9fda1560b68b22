"""The central server process: the global model, the strategy and the run folder; rounds train on the edges.

It runs the same experiment loop as ``smartsplit run`` (the same run folder: metrics.jsonl, decisions.jsonl,
state.pt, report), except that a round's training happens on the edge servers, each with its devices: the
server hands each edge its work (``NextRound``: the edge's instructions, its devices' instructions, their
hardware and availability, the round's clock) and waits for every edge's result (``FinishRound``: updates,
device results, faults, the bytes that crossed). An edge that restarts registers again and is handed its
unfinished round again; a server that restarts with ``--resume`` continues after the last round it saved,
and the edges, which keep retrying, carry on with it.

An edge's result is checked before anything of it is kept (``checks``): results for exactly the devices it was
given, updates of the units their cuts imply with the model's shapes and finite values, observations of those
units. A result that fails, or an edge silent past ``edge_timeout_s``, costs that edge's part of the round only
(its devices are reported dropped out, with an ``edge_malformed`` or ``edge_timeouts`` fault); the round closes
with the others.
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
from smartsplit.deploy.checks import Malformed, ModelShapes, check_int, check_number, check_observations
from smartsplit.deploy.wire import WireError, decode, encode, plain, typed
from smartsplit.fleet import Device
from smartsplit.messages import DeviceResult, Update
from smartsplit.roles.device import RoundTally, SimulatedTimes
from smartsplit.engine.round import RoundOutcome
from smartsplit.reports.summary import RunSummary
from smartsplit.runtime.embedded import run_experiment

log = logging.getLogger(__name__)

POLL_S = 20.0  # how long a NextRound call waits before telling the edge to ask again


class CentralService(rpc.CentralServicer):
    """The edges' side of the central server, and the executor that hands rounds to them."""

    def __init__(self, num_edges: int, edge_timeout_s: float = 900.0) -> None:
        self.num_edges = num_edges
        self.edge_timeout_s = edge_timeout_s
        self.shapes: ModelShapes | None = None
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
        devices = {d.id: {"device": plain(d), "x": x.train.x[x.shards[d.id]], "y": x.train.y[x.shards[d.id]],
                          "trace": plain(x.traces[d.id])}
                   for d in x.devices if x.central.edge_of(d.id) == edge}  # each device's own examples, no indices
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
        with self._changed:
            work = self.work.get(edge)
        try:
            kind, result = decode(request)
            if kind != "result" or not isinstance(result, dict) or result.get("round") != (work or {}).get("round"):
                return encode("stale")  # a round handed out before the server restarted, or delivered twice
            self._check_result(edge, result, work)
        except (Malformed, WireError) as exc:
            log.warning("round %s: refused edge-%d's result (%s); its part of the round is dropped",
                        (work or {}).get("round", -1) + 1, edge, exc)
            result = self._dropped(work, "edge_malformed")
        with self._changed:
            if self.work.get(edge) is not work or edge in self.results:
                return encode("stale")
            self.results[edge] = result
            self._changed.notify_all()
        return encode("ok")

    def _check_result(self, edge: int, result: dict, work: dict) -> None:
        """An edge's result holds a result for exactly each of its devices (in good form: ``checks``), updates of
        the units the round's cuts imply, and counts."""
        if set(result) != {"round", "edge", "updates", "results", "faults", "wire", "wall_s"} or result["edge"] != edge:
            raise Malformed(f"a result with fields {sorted(result)[:8]} for edge {result.get('edge')!r}")
        cuts = {i.device_id: i.cut for i, _, _ in work["devices"]}
        results = result["results"]
        if not isinstance(results, list) or not all(isinstance(r, DeviceResult) for r in results) or sorted(
                r.report.device for r in results) != sorted(cuts):
            raise Malformed(f"results for other devices than its {sorted(cuts)[:8]}")
        shapes, units = self.shapes, range(1, self.shapes.num_units + 1)
        for r in results:
            cut = cuts[r.report.device]
            if r.update is not None:
                shapes.check_update(r.update, range(1, cut + 1), r.report.samples, f"device {r.report.device}'s update")
            check_observations(r.observations, r.report.steps, units, f"device {r.report.device}'s observations")
        updates = result["updates"]
        if not isinstance(updates, list) or len(updates) > 2 * len(cuts) + 1:
            raise Malformed("more updates than its devices and its own copies")
        x = self.experiment
        most = sum(x.local_steps[d] for d in cuts) * x.config.training.batch_size  # every local step of its devices
        for update in updates:
            if not isinstance(update, Update) or not update.units:
                raise Malformed("an update that is not an Update of some units")
            trained = range(min(update.units), max(update.units) + 1)
            shapes.check_units(update.units, trained, "an update")
            if not update.samples or not set(update.samples) <= set(trained):
                raise Malformed(f"an update claiming samples for units {sorted(update.samples)[:8]}")
            for n in update.samples.values():
                check_int(n, "an update's samples", 0, most)
        for counts in (result["faults"], result["wire"]):
            if not isinstance(counts, dict) or not all(isinstance(k, str) for k in counts):
                raise Malformed("faults or wire counts that are not named")
            for name, count in counts.items():
                check_int(count, name[:40], 0, 1 << 50)
        check_number(result["wall_s"], "its wall time", low=0.0)

    def _dropped(self, work: dict, fault: str) -> dict:
        """An edge's part of the round, lost: its devices reported dropped out, nothing of theirs aggregated."""
        results = []
        for instructions, device, _ in work["devices"]:
            tally = RoundTally(assigned_cut=instructions.cut, cut=instructions.cut, dropped_out=True)
            results.append(DeviceResult(None, tally.report(typed(Device, device, "a device"), SimulatedTimes(), 0), []))
        return {"round": work["round"], "updates": [], "results": results, "faults": {fault: 1}, "wire": {}}

    # ---- the executor the experiment calls for each round

    def __call__(self, experiment, device_instructions, edge_instructions, observer) -> RoundOutcome:
        x = experiment
        by_edge: dict[int, list] = {e: [] for e in range(self.num_edges)}
        for instructions in device_instructions:
            d = instructions.device_id
            by_edge[x.central.edge_of(d)].append((instructions, plain(x.devices[d]), plain(x.availability[d])))
        if self.shapes is None:
            self.shapes = ModelShapes.of(x.architecture, tuple(x.train.shape), x.train.num_classes,
                                         x.config.training.batch_size)
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
            self._await_edges(edge_instructions[0].round)
            results, self.work = self.results, {}
            faults, self.faults = self.faults, Counter()
        wire: Counter = Counter()
        for e in range(self.num_edges):
            faults.update(results[e]["faults"])
            wire.update(results[e]["wire"])
        merged = sorted((r for e in range(self.num_edges) for r in results[e]["results"]), key=lambda r: r.report.device)
        for kind, count in sorted(faults.items()):
            log.warning("round %d: %d %s", edge_instructions[0].round + 1, count, kind.replace("_", " "))
        return RoundOutcome([results[e]["updates"] for e in range(self.num_edges)], merged, dict(faults), dict(wire),
                            measured=experiment.config.deployment.pace == "free")

    def _await_edges(self, rnd: int) -> None:
        """Every edge's result, or the deadline: an edge still silent then loses its part of the round (holding
        ``_changed``)."""
        started = waited = time.monotonic()
        while len(self.results) < self.num_edges:
            self._changed.wait(timeout=min(5.0, self.edge_timeout_s))
            missing = sorted(set(range(self.num_edges)) - set(self.results))
            if time.monotonic() - started > self.edge_timeout_s:
                for e in missing:
                    log.warning("round %d: edge-%d sent no result within %.0f s; its part of the round is dropped",
                                rnd + 1, e, self.edge_timeout_s)
                    self.results[e] = self._dropped(self.work[e], "edge_timeouts")
            elif time.monotonic() - waited > 60:
                log.warning("round %d: still waiting for edge servers %s", rnd + 1, missing)
                waited = time.monotonic()

    def finish(self, wait_s: float = 15.0) -> None:
        """The run is over: tell every edge that asks, waiting a while for the registered ones to hear it."""
        with self._changed:
            self.done = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.registered <= self.said_done, timeout=wait_s)


def run_server(config: Config, listen: str, certs: Path | None, run_dir: Path | None = None, *, resume: bool = False,
               overwrite: bool = False, progress: bool = True, edge_timeout_s: float = 900.0) -> RunSummary:
    """Serve ``config``'s run on ``listen`` until every round is done; returns its summary. An edge that sends no
    result within ``edge_timeout_s`` of a round's start loses its part of that round."""
    service = CentralService(len(config.edge.speeds()), edge_timeout_s)
    server, port = start_server([lambda s: rpc.add_CentralServicer_to_server(service, s)], listen, certs, "server")
    log.info("central server listening on port %d for %d edge servers", port, service.num_edges)
    try:
        return run_experiment(config, run_dir, progress=progress, resume=resume, overwrite=overwrite, executor=service)
    finally:
        service.finish()
        server.stop(grace=2.0).wait(5.0)  # its threads end before the interpreter does (else std::terminate)
