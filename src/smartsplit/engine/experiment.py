"""An experiment: data, fleet, model and strategy from a config (built by ``engine.build``), run round by round."""

from __future__ import annotations

import copy
import time
import dataclasses
import logging
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from smartsplit.config import Config
from smartsplit.data import Shards, label_counts, load_data, partition
from smartsplit.engine.build import (
    build_architecture, build_availability, build_fleet, build_traces, device_manager, start_meter,
)
from smartsplit.engine.forecast import FleetCandidates, FleetForecast
from smartsplit.engine.grouping import Grouping, grouped_compute_unavailable
from smartsplit.engine.learned import LearnedProfiles
from smartsplit.engine.round import Participant, RoundOutcome, RoundParts, assemble, simulate
from smartsplit.kernels.aggregate import all_finite
from smartsplit.errors import SmartSplitError, check_argument
from smartsplit.fleet.clock import EdgeSpec
from smartsplit.memory.model import optimizer_slots
from smartsplit.memory.ondevice import DevicePlan, OnDeviceManager, PlanMemo
from smartsplit.meter.heap import HeapMeter
from smartsplit.models.profile import ModelProfile, ProfileCache
from smartsplit.records import MB, RoundRecord
from smartsplit.roles.central import CentralRole
from smartsplit.roles.device import DeviceRole, OptimizerSpec, local_step_count
from smartsplit.roles.edge import EdgeRole
from smartsplit.messages import DeviceResult, EdgeInstructions, RoundInstructions, Update
from smartsplit.strategies import Candidate, RoundPlan, Strategy, make_strategy
from smartsplit.strategies.base import Candidates
from smartsplit.strategies.base import StepObserver

log = logging.getLogger(__name__)


class RoundExecutor(Protocol):
    """Runs a round's training from the central server's instructions: here (``Experiment.train_here``) or on
    edge servers and devices in other processes (``smartsplit.deploy``)."""

    def __call__(self, experiment: Experiment, device_instructions: list[RoundInstructions],
                 edge_instructions: list[EdgeInstructions], observer: StepObserver | None) -> RoundOutcome: ...




class Experiment:
    """Everything one run needs, built from a config and a seed; ``rounds()`` yields one record per round.

    The central role holds the global model and the strategy, a device role (made when the device first trains)
    its data shard, budget and on-device manager, one edge role per edge server its server-side copies; the round engine
    (``engine.round``) wires them with SimPy. The central server's view of the fleet (each device's class,
    data size, budget forecast and predicted plans per cut: ``candidates()``) is built here.
    """

    def __init__(self, config: Config, strategy: Strategy | None = None, meter: HeapMeter | None = None,
                 executor: RoundExecutor | None = None) -> None:
        check_argument("Experiment", "config", config, Config)
        check_argument("Experiment", "meter", meter, HeapMeter, type(None))
        self.config = config
        if (reason := grouped_compute_unavailable(config.device)) is not None:
            raise SmartSplitError(reason)
        self.meter = meter if meter is not None else start_meter(config) if config.meter else None
        self._owns_meter = meter is None
        self.measured: dict[tuple[int, int, tuple], int] = {}  # meter's step peak per (cut, micro-batch, segments)
        self.executor = executor
        self.train, self.test = load_data(config)
        self.input_shape = self.train.shape
        model = build_architecture(config, self.train)
        self.num_units = len(model)
        self.architecture = copy.deepcopy(model)  # the structure the device and edge roles build their copies from
        strategy = strategy or make_strategy(config.strategy, self.num_units, config.seed)
        if not isinstance(strategy, Strategy):
            raise SmartSplitError(f"strategy: {type(strategy).__name__} is not a smartsplit.Strategy; subclass it and "
                                  "implement configure_round (see README: your own strategy)")
        self.devices = build_fleet(config)
        self.shards = Shards(partition(
            self.train.y.numpy(),
            len(self.devices),
            config.data.partition,
            alpha=config.data.alpha,
            shards_per_client=config.data.shards_per_client,
            seed=config.seed,
        ))
        t = config.training
        self.label_counts = label_counts(self.train.y.numpy(), self.shards, self.train.num_classes)  # [device, class]
        self.samples = self.shards.sizes
        self.local_steps = [local_step_count(n, t.batch_size, t.local_steps, t.local_epochs) for n in self.samples.tolist()]
        self.optimizer = OptimizerSpec(t.optimizer, t.lr, t.momentum, optimizer_slots(t.optimizer, t.momentum))
        self.edge_specs = [EdgeSpec(g * 1e9, config.edge.latency_s) for g in config.edge.speeds()]  # one per edge server
        self.traces = build_traces(config, self.devices)
        self.availability = build_availability(config, self.devices)
        self.profiles = ProfileCache(self.meter, (t.optimizer, t.lr, t.momentum))
        self.plan_memo = PlanMemo()  # what every device's planning shares
        self._forecast: FleetForecast | None = None  # every device's predictions, made when a round first needs them
        self.learned = LearnedProfiles() if config.fleet.profiles == "learned" else None
        self.central = CentralRole(model, strategy, self.test, t.eval_batch_size, config.seed, len(self.edge_specs))
        if hasattr(executor, "evaluate"):  # the engine's workers score the test set's batches apart
            self.central.evaluator = executor.evaluate
        self._managers: dict[int, OnDeviceManager] = {}  # per device, made when first needed
        self._device_roles: dict[int, DeviceRole] = {}  # likewise: a fleet's memory grows with the devices used
        self.edge_roles = [EdgeRole(e, self.architecture, self.optimizer) for e in range(len(self.edge_specs))]
        self.clock_s = 0.0  # simulated time since the experiment started
        self.stopped: str | None = None  # why the run ended before its last round (nobody can train)
        self.grouping = None if t.grouping == "never" else Grouping(t.grouping, config.device, self.architecture,
                                                                  self.input_shape, self.train.num_classes)

    def manager(self, device_id: int) -> OnDeviceManager:
        """The device's on-device manager: its role plans with it, and the central server predicts its plans with
        the same one (plans are pure functions of the budget, so they share its cache)."""
        if device_id not in self._managers:
            self._managers[device_id] = device_manager(self.config, self.profile_at, self.optimizer, self.devices[device_id],
                                                       self.strategy.rules.checkpointing, self.plan_memo)
        return self._managers[device_id]

    def device_role(self, device_id: int) -> DeviceRole:
        if device_id not in self._device_roles:
            t, device = self.config.training, self.devices[device_id]
            self._device_roles[device_id] = DeviceRole(
                device, self.train, self.shards[device_id], self.traces[device_id], self.manager(device_id),
                self.architecture, self.optimizer, t.batch_size, t.local_steps, t.local_epochs,
                measure=self.measured_peak if self.meter is not None else None)
        return self._device_roles[device_id]

    @property
    def model(self) -> nn.Sequential:
        """The global model (the central server's)."""
        return self.central.model

    @property
    def strategy(self) -> Strategy:
        return self.central.strategy

    def close(self) -> None:
        """Stop the memory meter's child process (if this experiment started it)."""
        if self._owns_meter and self.meter is not None:
            self.meter.close()

    def measured_peak(self, plan: DevicePlan) -> int:
        """The meter's peak for one device step under ``plan`` at the full batch, measured once per plan shape."""
        key = (plan.cut, plan.micro_batch, plan.segments)
        if key not in self.measured:
            t = self.config.training
            self.measured[key] = self.meter.step_peak(
                self.architecture[: plan.cut], self.train.shape, t.batch_size, micro_batch=plan.micro_batch,
                segments=plan.segments, optimizer=(t.optimizer, t.lr, t.momentum), num_classes=self.train.num_classes,
                to_edge=plan.cut < self.num_units,
            )
        return self.measured[key]

    def profile_at(self, batch: int) -> ModelProfile:
        return self.profiles.get(self.config.model.name, self.architecture, self.input_shape, batch)

    @property
    def profile(self) -> ModelProfile:
        return self.profile_at(self.config.training.batch_size)

    def budget_forecasts(self, ids: np.ndarray) -> np.ndarray:
        """A low quantile of the budget each device had over the recent window (at the start: its budget then)."""
        b, now = self.config.fleet.budgets, self.clock_s
        return self.traces.forecast(ids, b.forecast_quantile, max(0.0, now - b.forecast_window_s), max(now, 0.0))

    def candidates(self) -> Candidates:
        """Every device online now, with its budget forecast and its predicted peaks and times per cut, as
        columns. Figures at a cut are predicted when a strategy first reads them, and a device's are kept until
        its budget forecast (or, with learned profiles, its learned speed) changes."""
        now, availability = self.clock_s, self.availability
        ids = np.array([i for i in range(len(self.devices)) if availability[i].online_at(now)], dtype=np.int64)
        budgets = self.budget_forecasts(ids)
        learned = self.learned
        speeds = self.devices.speeds[ids]
        if learned is not None:
            devices = [learned.device(self.devices[i]) for i in ids.tolist()]
            speeds = np.array([(d.flops_per_s, d.uplink_bytes_per_s, d.downlink_bytes_per_s) for d in devices],
                              dtype=float).reshape(len(devices), 3)
        if self._forecast is None:
            self._forecast = FleetForecast(self.manager(0), self.profile, len(self.devices), self.edge_specs,
                                           self.central.edge_of(np.arange(len(self.devices))),
                                           np.array(self.local_steps, dtype=np.int64))
        self._forecast.offer(ids, budgets, speeds)
        device = (lambda i: learned.device(self.devices[i])) if learned is not None else self.devices.__getitem__
        return FleetCandidates(self._forecast, ids, budgets, self.samples[ids], self.central.edge_of(ids),
                               self.label_counts[ids], device).columns()

    def run_round(self, rnd: int) -> RoundRecord:
        """One round: the strategy plans it over the candidates, the executor trains it, the central server
        aggregates (and evaluates, on evaluation rounds); the clock moves on by the round's latency."""
        started = time.perf_counter()
        t = self.config.training
        candidates = self.candidates()
        plan = self.central.plan_round(rnd, candidates, t.devices_per_round)
        decision = self._decision(rnd, plan, candidates)
        device_instructions, edge_instructions = self.central.instructions(rnd, plan, self.clock_s)
        observer = self.central.step_observer()
        outcome = (self.executor or Experiment.train_here)(self, device_instructions, edge_instructions, observer)
        latency = max((r.finish_s for r in outcome.reports), default=0.0)
        self.clock_s += latency
        if self.learned is not None:
            self.learned.learn(outcome.reports, {a["device"]: a["predicted_round_s"] for a in decision["assignments"]})
        empty, idle = self._empty(rnd, plan, candidates, outcome), 0.0
        if empty is not None and latency == 0.0:
            idle = self._wait_for_a_change()
        evaluated = (rnd + 1) % t.eval_every == 0 or rnd + 1 == t.rounds or self.stopped is not None
        updates, results, faults = self._finite_only(rnd, outcome)
        evaluation = self.central.finish_round(rnd, updates, results, evaluated)
        self._check_finite(rnd)
        outcome = dataclasses.replace(outcome, faults=faults)
        record = self._record(rnd, plan, candidates, outcome, evaluation, latency, decision, time.perf_counter() - started)
        return dataclasses.replace(record, empty=empty, idle_s=idle)

    def _empty(self, rnd: int, plan: RoundPlan, candidates: Sequence[Candidate], outcome: RoundOutcome) -> str | None:
        """Why nobody trained this round (None: somebody finished a step), said in the log."""
        reports = outcome.reports
        if any(r.steps for r in reports):
            return None
        if not candidates:
            reason = f"no device online (all {len(self.devices)} offline)"
        elif not plan.assignments:
            reason = (f"no online device picked: {plan.excluded} of {len(candidates)} excluded (no cut fits their "
                      "budget forecast)" if plan.excluded else f"the strategy picked none of {len(candidates)} online devices")
        else:
            oom = sum(1 for r in reports if r.oom_events)
            dropped = sum(1 for r in reports if r.dropped_out)
            reason = (f"none of the {len(reports)} assigned devices finished a step ({oom} out of memory, {dropped} "
                      f"dropped out, {len(reports) - oom - dropped} found no plan that fits before the round ended)")
        log.warning("round %d trained nobody: %s", rnd + 1, reason)
        return reason

    def _wait_for_a_change(self) -> float:
        """Move the clock on to the next moment a device comes online or a budget forecast changes (the seconds
        waited); when there is none, nobody will ever train: ``stopped`` says so and the run ends."""
        now = self.clock_s
        window = self.config.fleet.budgets.forecast_window_s
        moments = []
        for device in self.devices:
            moments.append(self.availability[device.id].online_from(now))
            trace = self.traces[device.id]
            moments.append(trace.next_change(now))  # a change enters the forecast's window ...
            left = trace.next_change(now - window)
            moments.append(left + window if left is not None else None)  # ... and later leaves it
        later = [m for m in moments if m is not None and m > now]
        if not later:
            self.stopped = ("no device can ever train: none comes online again and no budget changes after "
                            f"{now:.0f} s simulated; change fleet.availability or fleet.budgets")
            log.error("%s: %s", self.config.name, self.stopped)
            return 0.0
        self.clock_s = min(later)
        log.warning("the clock moves %.1f s on, to %.1f s, when a device comes online or a budget changes",
                    self.clock_s - now, self.clock_s)
        return self.clock_s - now

    def _finite_only(self, rnd: int, outcome: RoundOutcome) -> tuple[list[list[Update]], list[DeviceResult], dict]:
        """The round's updates without those holding NaN or infinity (a diverging device or edge copy), the
        results without the refused devices' step observations, and the faults to record. The global model keeps
        the last finite weights of the units those would have trained."""
        kept = [[u for u in group if all_finite(u)] for group in outcome.updates]
        refused = sum(map(len, outcome.updates)) - sum(map(len, kept))
        if not refused:
            return outcome.updates, outcome.results, outcome.faults
        bad = {r.report.device for r in outcome.results if r.update is not None and not all_finite(r.update)}
        log.warning("round %d: refused %d update(s) holding NaN or infinity (devices %s); their units keep the last "
                    "finite weights. Training is diverging: lower training.lr", rnd + 1, refused, sorted(bad))
        results = [DeviceResult(r.update, r.report, []) if r.report.device in bad else r for r in outcome.results]
        return kept, results, {**outcome.faults, "non_finite_updates": refused}

    def _check_finite(self, rnd: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise SmartSplitError(f"round {rnd + 1}: the global model holds NaN or infinity after aggregation: training "
                                  "diverged. The run stops here; state.pt keeps the last finite round. Lower training.lr "
                                  "and start again")

    def _decision(self, rnd: int, plan: RoundPlan, candidates: Sequence[Candidate]) -> dict:
        """What the strategy decided and on what figures (``decisions.jsonl``'s line)."""
        columns, picked = Candidates.of(candidates), [a.device_id for a in plan.assignments]
        by_id = dict(zip(picked, map(columns.__getitem__, columns.rows_of(picked).tolist())))
        return {
            "round": rnd + 1,
            "strategy": self.strategy.name,
            "candidates": len(candidates),
            "excluded": plan.excluded,
            "assignments": [
                {
                    "device": a.device_id,
                    "class": self.devices[a.device_id].device_class,
                    "cut": a.cut,
                    "budget_forecast_mb": round(by_id[a.device_id].budget / MB, 3),
                    "feasible_cuts": list(by_id[a.device_id].feasible_cuts),
                    "predicted_step_s": by_id[a.device_id].step_times[a.cut - 1],
                    # the clock model's whole round for the device at this cut, edge queue aside
                    "predicted_round_s": by_id[a.device_id].round_times[a.cut - 1] if by_id[a.device_id].round_times else None,
                }
                for a in plan.assignments
            ],
            **plan.notes,
        }

    def _record(self, rnd: int, plan: RoundPlan, candidates: Sequence[Candidate], outcome: RoundOutcome, evaluation,
                latency: float, decision: dict, wall_s: float) -> RoundRecord:
        reports = outcome.reports
        compute_s = sum(r.compute_s for r in reports)
        return RoundRecord(
            round=rnd + 1,
            accuracy=evaluation.accuracy if evaluation else None,
            loss=evaluation.loss if evaluation else None,
            participants=len(plan.assignments),
            excluded=plan.excluded,
            offline=len(self.devices) - len(candidates),
            dropouts=sum(r.dropped_out for r in reports),
            cuts=[r.cut for r in reports],
            oom_events=sum(r.oom_events for r in reports),
            peak_predicted_mb=[r.peak_predicted_mb for r in reports],
            peak_measured_mb=[r.peak_measured_mb for r in reports],
            peak_measured_by=self.meter.name if self.meter is not None else None,
            bytes_up=sum(r.bytes_up for r in reports),
            bytes_down=sum(r.bytes_down for r in reports),
            replans=sum(r.replans for r in reports),
            cut_moves=sum(r.cut_moves for r in reports),
            pauses=sum(r.pauses for r in reports),
            recompute_s=sum(r.recompute_s for r in reports),
            recompute_pct=100 * sum(r.recompute_s for r in reports) / max(compute_s, 1e-12),
            unit_importance=plan.notes.get("unit_importance"),  # the MEC manager's scores this round's cuts used
            mec_moves=plan.notes.get("mec_moves_by_direction"),
            latency_s=latency,
            clock_s=self.clock_s,
            wall_s=wall_s,
            faults=outcome.faults or None,
            wire=outcome.wire or None,
            clock="measured" if outcome.measured else "simulated",
            devices=reports,
            decision=decision,
        )

    def train_here(self, device_instructions: list[RoundInstructions], edge_instructions: list[EdgeInstructions],
                   observer: StepObserver | None) -> RoundOutcome:
        """The round's training in this process: every device and edge role, wired by the round engine (the
        default ``RoundExecutor``: called as ``Experiment.train_here(experiment, ...)`` like any other)."""
        parts = self.train_part(device_instructions, edge_instructions, range(len(self.edge_roles)), observer)
        return assemble(parts, len(self.edge_specs))

    def train_part(self, device_instructions: Sequence[RoundInstructions], edge_instructions: list[EdgeInstructions],
                   edges: Iterable[int], observer: StepObserver | None) -> RoundParts:
        """Some of the round's devices, with the ``edges`` they train through, simulated together here: the whole
        round (``train_here``), or a worker's part of it (``runtime.workers``)."""
        for e in edges:
            self.edge_roles[e].start_round(edge_instructions[e], observer)
        participants = [
            Participant(self.device_role(i.device_id), i, self.central.edge_of(i.device_id), self.availability[i.device_id])
            for i in device_instructions
        ]
        return simulate(participants, self.edge_roles, self.edge_specs, self.profile, start_s=self.clock_s,
                        deadline_s=self.config.training.round_deadline_s, options=self.strategy.execution,
                        observer=observer, grouping=self.grouping)

    def state_dict(self, rounds_done: int) -> dict:
        """Everything a resumed run needs to continue exactly as this one would have."""
        return {
            "rounds_done": rounds_done,
            **self.central.state_dict(),
            "clock_s": self.clock_s,
            "learned": self.learned.state_dict() if self.learned is not None else None,
            "measured": [[cut, micro, [list(s) for s in segments], peak] for (cut, micro, segments), peak in self.measured.items()],
        }

    def load_state_dict(self, state: dict) -> int:
        self.central.load_state_dict(state)
        self.clock_s = state["clock_s"]
        if self.learned is not None:
            self.learned.load_state_dict(state.get("learned") or {})
        self.measured = {(cut, micro, tuple(tuple(s) for s in segments)): peak for cut, micro, segments, peak in state.get("measured", [])}
        return state["rounds_done"]

    def rounds(self, start: int = 0) -> Iterator[RoundRecord]:
        """One record per round from ``start``; fewer when nobody can ever train again (``stopped`` says why)."""
        for rnd in range(start, self.config.training.rounds):
            yield self.run_round(rnd)
            if self.stopped is not None:
                return
