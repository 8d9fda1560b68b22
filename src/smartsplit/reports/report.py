"""A markdown report with figures comparing runs: ``write_report(run_dirs, out_dir)``.

Runs are grouped by strategy (``strategy.name`` in their config.yaml, plus the cut when one is fixed there);
several seeds of one strategy form one group, drawn as a mean with a min–max band. Figures are drawn on
standalone Agg figures, so pyplot state and global rcParams are never touched.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from smartsplit.errors import SmartSplitError
from smartsplit.records import MB, RoundRecord
from smartsplit.reports.summary import SUMMARY_HEADERS, RunSummary, summarise, summary_rows
from smartsplit.reports.table import markdown_table

NAN = float("nan")


@dataclass
class Run:
    path: Path
    strategy: str
    seed: object
    fleet_size: int | None
    records: list[dict]
    target: float | None = None


def load_run(path: str | Path) -> Run:
    """Read one run folder (config.yaml and metrics.jsonl); a trailing half-written line is skipped."""
    path = Path(path)
    if not path.is_dir():
        raise SmartSplitError(f"run folder {path} not found")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        lines = (path / "metrics.jsonl").read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SmartSplitError(f"run folder {path}: cannot read config.yaml/metrics.jsonl ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break  # the run is still writing this line
            raise SmartSplitError(f"{path / 'metrics.jsonl'}: line {number} is not valid JSON") from None
    if not isinstance(config, dict) or not records or not all(isinstance(r, dict) for r in records):
        raise SmartSplitError(f"run folder {path}: no rounds recorded in metrics.jsonl or config.yaml is not a mapping")
    strategy = config.get("strategy") or {}
    label = str(strategy.get("name", path.name))
    if strategy.get("cut") is not None:
        label += f" (cut={strategy['cut']})"
    return Run(path, label, config.get("seed"), (config.get("fleet") or {}).get("devices"), records,
               config.get("target_accuracy"))


# ---------------------------------------------------------------- per-round series over seeds


def _num(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else NAN


def _devices(record: dict) -> list[dict]:
    return [d for d in record.get("devices") or [] if isinstance(d, dict)]


def _matrix(runs: list[Run], metric: Callable[[dict], float]) -> np.ndarray:
    """Rounds x seeds; NaN where a seed has fewer rounds or lacks the value."""
    out = np.full((max(len(r.records) for r in runs), len(runs)), NAN)
    for j, run in enumerate(runs):
        out[: len(run.records), j] = [metric(rec) for rec in run.records]
    return out


def _band(ax, x: np.ndarray, values: np.ndarray, colour: str, label: str) -> None:
    """Mean over seeds as a line, min–max over seeds as a shaded band."""
    ok = ~np.all(np.isnan(values), axis=1)
    if not ok.any():
        return
    x, values = x[ok], values[ok]
    ax.plot(x, np.nanmean(values, axis=1), color=colour, marker="o", markersize=3, label=label)
    if values.shape[1] > 1:
        ax.fill_between(x, np.nanmin(values, axis=1), np.nanmax(values, axis=1), color=colour, alpha=0.2, linewidth=0)


def _rounds(values: np.ndarray) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def _round_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.4")


def _legend(ax, seeds_band: bool = True) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        title = "strategy (band: min–max over seeds)" if seeds_band else "strategy"
        ax.legend(handles, labels, title=title, fontsize=8, title_fontsize=8)


# ---------------------------------------------------------------- figures


def fig_accuracy_round(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, runs in groups.items():
        acc = _matrix(runs, lambda r: _num(r.get("accuracy")))
        _band(ax, _rounds(acc), acc, colours[name], f"{name} (n={len(runs)})")
    ax.set(title="Test accuracy per round", xlabel="round", ylabel="test accuracy (fraction)")
    _round_axis(ax)
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def fig_accuracy_time(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, runs in groups.items():
        acc = _matrix(runs, lambda r: _num(r.get("accuracy")))
        clock = np.nancumsum(_matrix(runs, lambda r: _num(r.get("latency_s"))), axis=0)
        _band(ax, np.nanmean(clock, axis=1), acc, colours[name], f"{name} (n={len(runs)})")
    ax.set(title="Test accuracy against simulated time", xlabel="simulated time, cumulative round latency (s)",
           ylabel="test accuracy (fraction)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def fig_memory(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    budgets, peaks, oom = [], [], False
    for i, (name, runs) in enumerate(groups.items()):
        points = [(_num(d.get("budget_mb")), _num(d.get("peak_measured_mb")), _num(d.get("oom_events")))
                  for run in runs for rec in run.records for d in _devices(rec)]
        points = [p for p in points if p[0] > 0 and p[1] > 0]
        if not points:
            continue
        b, p, o = map(np.array, zip(*points))
        ax.scatter(b, p, s=30, marker="os^Dv<>ph*"[i % 10], facecolors="none", edgecolors=colours[name], label=name)
        ax.scatter(b[o > 0], p[o > 0], s=70, marker="x", color="red", linewidths=1.5)
        budgets += list(b)
        peaks += list(p)
        oom |= bool((o > 0).any())
    if not budgets:
        _note(ax, "no per-device memory recorded")
    else:
        # Each axis spans its own data (peaks are often far below the largest budgets); y = x is drawn throughout.
        (x0, x1), (y0, y1) = (min(budgets) / 1.3, max(budgets) * 1.3), (min(peaks) / 1.3, max(peaks) * 1.3)
        lo, hi = min(x0, y0), max(x1, y1)
        if x1 / x0 > 20 or y1 / y0 > 20:
            ax.set(xscale="log", yscale="log")
            for axis, span in ((ax.xaxis, x1 / x0), (ax.yaxis, y1 / y0)):  # plain numbers, not 4×10^1
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if span < 10 else NullFormatter())
        ax.plot([lo, hi], [lo, hi], color="0.3", linestyle="--", linewidth=1, label="y = x (peak = budget)")
        ax.fill_between([lo, hi], [lo, hi], [hi, hi], color="red", alpha=0.06, linewidth=0,
                        label="over budget (peak > budget)")
        ax.set(xlim=(x0, x1), ylim=(y0, y1))
        if oom:
            ax.scatter([], [], s=70, marker="x", color="red", label="device with OOM event(s)")
    ax.set(title="Measured peak memory per device and round against its budget",
           xlabel="device memory budget (MB)", ylabel="measured peak memory (MB)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, seeds_band=False)
    return fig


def fig_latency(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    per_round, cdf = fig.subplots(1, 2)
    for name, runs in groups.items():
        lat = _matrix(runs, lambda r: _num(r.get("latency_s")))
        _band(per_round, _rounds(lat), lat, colours[name], f"{name} (n={len(runs)})")
        pooled = np.sort(lat[~np.isnan(lat)])
        if len(pooled):
            cdf.step(pooled, np.arange(1, len(pooled) + 1) / len(pooled), where="post", color=colours[name], label=name)
    per_round.set(title="Simulated round latency (slowest participant)", xlabel="round", ylabel="round latency (s)")
    cdf.set(title="CDF of round latency (all rounds and seeds)", xlabel="round latency (s)",
            ylabel="fraction of rounds ≤ latency", ylim=(0, 1.02))
    _round_axis(per_round)
    for ax, band in ((per_round, True), (cdf, False)):
        ax.grid(alpha=0.3)
        _legend(ax, band)
    return fig


def fig_cuts(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    cuts = sorted({int(c) for runs in groups.values() for run in runs for rec in run.records
                   for c in rec.get("cuts") or [] if isinstance(c, (int, float))})
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    palette = {c: colormaps["viridis"](i / max(len(cuts) - 1, 1)) for i, c in enumerate(cuts)}
    for ax, (name, runs) in zip(axes, groups.items()):
        counts = np.zeros((max(len(r.records) for r in runs), len(cuts)))
        seeds = np.zeros(len(counts))
        for run in runs:
            for i, rec in enumerate(run.records):
                seeds[i] += 1
                for c in rec.get("cuts") or []:
                    if isinstance(c, (int, float)):
                        counts[i, cuts.index(int(c))] += 1
        counts /= np.maximum(seeds, 1)[:, None]
        bottom = np.zeros(len(counts))
        for k, cut in enumerate(cuts):
            ax.bar(_rounds(counts), counts[:, k], bottom=bottom, color=palette[cut], width=0.85)
            bottom += counts[:, k]
        ax.set(title=name, xlabel="round", ylabel="participants per cut (mean over seeds)")
        _round_axis(ax)
        if not cuts:
            _note(ax, "no cuts recorded")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle("Cut distribution over rounds (cut = units on the device)")
    if cuts:
        fig.legend([Patch(color=palette[c]) for c in cuts], [f"cut {c}" for c in cuts], loc="outside lower center",
                   ncols=min(len(cuts), 8), title="cut point", fontsize=8, title_fontsize=8)
    return fig


def fig_importance(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    """Units x rounds heat map of the MEC manager's importance scores, with its cut moves each way per round."""
    scored = {}
    for name, runs in groups.items():
        units = sorted({int(u) for run in runs for rec in run.records for u in (rec.get("unit_importance") or {})})
        if units:
            scored[name] = (runs, units)
    ncols = max(min(len(scored), 3), 1)
    nrows = max(math.ceil(len(scored) / ncols), 1)
    fig = Figure(figsize=(max(6.0 * ncols, 7.0), 4.2 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    if not scored:
        _note(axes[0], "no unit importance recorded (no strategy used the MEC manager)")
    image = None
    for ax, (name, (runs, units)) in zip(axes, scored.items()):
        rounds = max(len(r.records) for r in runs)
        grid = np.full((len(units), rounds, len(runs)), NAN)
        deeper, shallower = np.zeros(rounds), np.zeros(rounds)
        for j, run in enumerate(runs):
            for i, rec in enumerate(run.records):
                for u, v in (rec.get("unit_importance") or {}).items():
                    grid[units.index(int(u)), i, j] = _num(v)
                moves = rec.get("mec_moves") or {}
                deeper[i] += _num(moves.get("deeper", 0)) / len(runs)
                shallower[i] += _num(moves.get("shallower", 0)) / len(runs)
        with warnings.catch_warnings():  # rounds before the first score are all NaN, and stay blank
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(grid, axis=2)
        image = ax.imshow(mean, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                          extent=(0.5, rounds + 0.5, units[0] - 0.5, units[-1] + 0.5))
        ax.set(title=name, xlabel="round", ylabel="unit")
        _round_axis(ax)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        twin = ax.twinx()
        x = np.arange(1, rounds + 1)
        twin.step(x, deeper, where="mid", color="tab:cyan", label="cuts moved deeper")
        twin.step(x, -shallower, where="mid", color="tab:green", label="cuts moved shallower (negative)")
        twin.axhline(0, color="0.6", linewidth=0.5)
        twin.set_ylabel("MEC cut moves per round (mean over seeds)")
        twin.legend(loc="upper right", fontsize=7)
    for ax in axes[max(len(scored), 1):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(scored)]), label="importance (0: devices agree as noise would; 1: they disagree)")
    fig.suptitle("The MEC manager's unit importance over rounds, and its cut moves")
    return fig


def fig_recompute(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    missing = []
    for name, runs in groups.items():
        if not any("recompute_s" in d for run in runs for rec in run.records for d in _devices(rec)):
            missing.append(name)
            continue
        rec_s = _matrix(runs, lambda r: sum(_num(d.get("recompute_s", 0.0)) for d in _devices(r)))
        _band(ax, _rounds(rec_s), rec_s, colours[name], f"{name} (n={len(runs)})")
    if len(missing) == len(groups):
        _note(ax, "no recompute recorded")
        ax.set_xlim(0.5, max(len(run.records) for runs in groups.values() for run in runs) + 0.5)
    elif missing:
        ax.plot([], [], " ", label="no recompute recorded: " + ", ".join(missing))
    ax.set_ylim(bottom=0)
    ax.set(title="Recompute overhead per round", xlabel="round",
           ylabel="recompute time summed over devices (simulated s)")
    ax.grid(alpha=0.3)
    _round_axis(ax)
    _legend(ax)
    return fig


def fig_bytes(groups: dict[str, list[Run]], colours: dict[str, str]) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, runs in groups.items():
        traffic = _matrix(runs, lambda r: (_num(r.get("bytes_up", 0)) + _num(r.get("bytes_down", 0))) / MB)
        _band(ax, _rounds(traffic), traffic, colours[name], f"{name} (n={len(runs)})")
    ax.set(title="Traffic per round (uplink + downlink, all participants)", xlabel="round",
           ylabel="bytes per round (MB)")
    ax.set_ylim(bottom=0)
    _round_axis(ax)
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


FIGURES: list[tuple[str, Callable, str]] = [
    ("accuracy_round.png", fig_accuracy_round,
     "Test accuracy after each round; line = mean over seeds, band = min–max over seeds."),
    ("accuracy_time.png", fig_accuracy_time,
     "Test accuracy against simulated time (cumulative round latency, mean over seeds)."),
    ("memory.png", fig_memory,
     "Peak memory of each participating device in each round against its budget, measured by the memory meter "
     "(the live heap of a child process running the device's step under its plan, once per plan shape); points above the "
     "dashed y = x line exceed the budget, red crosses mark devices with out-of-memory events; hollow markers, one shape per strategy, so overlaps show."),
    ("latency.png", fig_latency,
     "Simulated round latency (the slowest participant) per round, and its empirical CDF over all rounds and seeds."),
    ("cuts.png", fig_cuts,
     "Participants per cut point in each round (mean over seeds), one panel per strategy."),
    ("importance.png", fig_importance,
     "The MEC manager's importance score of each unit (the scores each round's cuts were decided on; mean over "
     "seeds), with its cut moves per round: deeper above zero, shallower below. Strategies without the MEC "
     "manager are left out."),
    ("recompute.png", fig_recompute,
     "Recompute overhead per round: devices' recompute time summed, mean over seeds."),
    ("bytes.png", fig_bytes,
     "Bytes sent per round, uplink plus downlink over all participants (MB = 2^20 bytes)."),
]


# ---------------------------------------------------------------- table and report


def run_summary(run: Run) -> RunSummary:
    """The run's summary, computed from its metrics as ``run`` and ``compare`` compute it."""
    return summarise([RoundRecord.from_json(r) for r in run.records], name=run.path.name, strategy=run.strategy,
                     seed=run.seed, fleet_size=run.fleet_size, target=run.target, run_dir=str(run.path),
                     profiles=_profiles(run.path))


def _profiles(run_dir: Path) -> dict | None:
    """Which memory profiles the run planned from, as its ``summary.json`` recorded (None: not recorded)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("profiles")
    except (OSError, ValueError, AttributeError):
        return None


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write figures (PNG) and report.md comparing ``run_dirs`` into ``out_dir``; returns the report.md path."""
    if not run_dirs:
        raise SmartSplitError("report: no run folders given")
    runs = [load_run(p) for p in run_dirs]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.strategy, []).append(run)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(groups)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    targets = sorted({run.target for run in runs if run.target is not None})
    lines = ["# SmartSplit report", "", "## Summary", "",
             markdown_table(SUMMARY_HEADERS, summary_rows([run_summary(run) for run in runs]))]
    lines += ["", "Mean ± standard deviation over seeds where a strategy has several; \"to target\" is the first "
              f"round (and simulated second) at test accuracy {', '.join(map(str, targets)) or '(no target set)'} or above, "
              "averaged over the seeds that reached it; latencies are simulated seconds per round; participation is the "
              "share of the fleet neither excluded for memory nor offline, averaged over rounds; max peak is the largest "
              "device peak in any round, measured by the memory meter (a malloc counter in a child process that runs the "
              "device's step under its plan: every heap byte, library scratch included).", "",
              "## Figures", ""]
    for number, (filename, draw, caption) in enumerate(FIGURES, 1):
        fig = draw(groups, colours)
        FigureCanvasAgg(fig)  # Agg for this figure only; no pyplot, no global backend switch
        fig.savefig(out_dir / filename, dpi=120)
        fig.clear()
        lines += [f"![Figure {number}]({filename})", "", f"*Figure {number}.* {caption}", ""]
    lines += ["## Runs", "", "| strategy | seed | rounds | folder |", "|---|---|---|---|"]
    lines += [f"| {run.strategy} | {run.seed} | {len(run.records)} | `{run.path}` |" for run in runs]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
