"""One summary per run, and the one table of them that the console, ``report.md`` and ``compare --markdown`` show."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from smartsplit.records import RoundRecord


@dataclass(frozen=True)
class RunSummary:
    name: str
    strategy: str
    seed: int | None
    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    participation_rate: float | None  # share of the fleet not excluded for memory nor offline, mean over rounds
    mean_participants: float
    max_peak_measured_mb: float  # 0.0 when nothing was measured
    mean_round_latency_s: float
    peak_round_latency_s: float
    simulated_time_s: float
    oom_events: int
    pauses: int
    dropouts: int
    cut_moves: int
    replans: int
    recompute_pct: float
    target_accuracy: float | None
    to_target: dict | None  # {"round", "clock_s"} of the first round at or above the target
    wall_s: float | None
    empty_rounds: int = 0  # rounds in which nobody trained (each says why in metrics.jsonl)
    stopped: str | None = None  # why the run ended before its last round
    run_dir: str | None = None
    profiles: dict | None = None  # which memory profiles the run planned from (engine.build.profile_sources)
    grouping: dict | None = None  # whether devices stepped together, as measured and chosen (engine.grouping)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(records: Sequence[RoundRecord], *, name: str, strategy: str, seed: int | None, fleet_size: int | None,
              target: float | None = None, wall_s: float | None = None, run_dir: str | None = None,
              profiles: dict | None = None, stopped: str | None = None, grouping: dict | None = None) -> RunSummary:
    n = max(len(records), 1)
    evaluated = [r for r in records if r.accuracy is not None]
    reached = next((r for r in evaluated if target is not None and r.accuracy >= target), None)
    peaks = [p for r in records for p in r.peak_measured_mb or [] if p is not None]
    latencies = [r.latency_s for r in records if r.empty is None]  # an empty round has no latency to compare
    participation = None
    if fleet_size:
        participation = sum(1 - ((r.excluded or 0) + (r.offline or 0)) / fleet_size for r in records) / n
    return RunSummary(
        name=name,
        strategy=strategy,
        seed=seed,
        rounds=len(records),
        final_accuracy=evaluated[-1].accuracy if evaluated else None,
        best_accuracy=max((r.accuracy for r in evaluated), default=None),
        participation_rate=participation,
        mean_participants=sum(r.participants for r in records) / n,
        max_peak_measured_mb=max(peaks, default=0.0),
        mean_round_latency_s=sum(latencies) / max(len(latencies), 1),
        peak_round_latency_s=max(latencies, default=0.0),
        simulated_time_s=sum(r.latency_s + r.idle_s for r in records),
        empty_rounds=sum(r.empty is not None for r in records),
        oom_events=sum(r.oom_events or 0 for r in records),
        pauses=sum(r.pauses or 0 for r in records),
        dropouts=sum(r.dropouts or 0 for r in records),
        cut_moves=sum(r.cut_moves or 0 for r in records),
        replans=sum(r.replans or 0 for r in records),
        recompute_pct=sum(r.recompute_pct or 0.0 for r in records) / n,
        target_accuracy=target,
        to_target={"round": reached.round, "clock_s": reached.clock_s} if reached else None,
        wall_s=wall_s,
        stopped=stopped,
        run_dir=run_dir,
        profiles=profiles,
        grouping=grouping,
    )


def result_line(summary: RunSummary) -> str:
    """The run's last line on the console: its accuracy, rounds, rounds nobody trained in, and where it stopped."""
    accuracy = "none (never evaluated)" if summary.final_accuracy is None else f"{summary.final_accuracy:.4f}"
    line = f"final accuracy {accuracy} after {summary.rounds} rounds; results in {summary.run_dir}"
    if summary.empty_rounds:
        line += f"\nwarning: nobody trained in {summary.empty_rounds} of the {summary.rounds} rounds (metrics.jsonl: empty)"
    if summary.stopped:
        line += f"\nthe run stopped early: {summary.stopped}"
    return line


def profiles_line(sources: Sequence[dict | None]) -> str:
    """One line saying which memory profiles runs planned from (``RunSummary.profiles`` of each run)."""
    known = [s for s in sources if s]
    kinds = sorted({s["source"] for s in known})
    if not kinds:
        return "memory profiles: not recorded"
    if kinds == ["none"]:
        return "memory profiles: none (meter off: plans from saved-tensor sizes alone, the same on every machine)"
    host = sum(s.get("host", 0) for s in known)
    shipped = sum(s.get("shipped", 0) for s in known)
    if "shipped" in kinds:
        origin = next(s.get("shipped_from") for s in known if s["source"] == "shipped")
        line = f"memory profiles: shipped with SmartSplit (measured on {origin or 'an unrecorded machine'}" + (
            f"; {shipped} figures)" if shipped else ")")
        if host:
            line += f"; {host} figures not shipped were measured on this machine"
        return line + "; --calibrate measures all of them here"
    return "memory profiles: measured on this machine (--calibrate" + (f"; {host} figures)" if host else ")")


SUMMARY_HEADERS = (
    "strategy", "seeds", "final acc", "rounds to target", "sim s to target", "mean latency s", "peak latency s",
    "participation", "max peak MB", "OOM", "pauses", "drop-outs",
)


def summary_rows(summaries: Sequence[RunSummary]) -> list[list[object]]:
    """One row per strategy, over its seeds: mean ± spread, and time to the target accuracy where reached."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.strategy, []).append(s)
    rows = []
    for name, runs in groups.items():
        reached = [r.to_target for r in runs if r.to_target]
        participation = [r.participation_rate for r in runs if r.participation_rate is not None]
        rows.append(
            [
                name,
                len(runs),
                _spread([r.final_accuracy for r in runs if r.final_accuracy is not None], "{:.3f}"),
                _spread([t["round"] for t in reached], "{:.1f}") + ("" if len(reached) == len(runs) else f" ({len(reached)}/{len(runs)})"),
                _spread([t["clock_s"] for t in reached], "{:.0f}") if reached else "-",
                _spread([r.mean_round_latency_s for r in runs], "{:.1f}"),
                max(r.peak_round_latency_s for r in runs),
                f"{100 * _mean(participation):.0f}%" if participation else "-",
                max(r.max_peak_measured_mb for r in runs),
                sum(r.oom_events for r in runs),
                sum(r.pauses for r in runs),
                sum(r.dropouts for r in runs),
            ]
        )
    return rows


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    mean = _mean(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{fmt.format(mean)} ± {fmt.format(std)}"
