"""The testbed's page: measured against simulated round latency per strategy (``write_testbed_report``), from the
plain data ``testbed.json`` holds, and the fidelity figures the page and the benchmark print (``fidelity``)."""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from smartsplit.reports.table import markdown_table

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def fidelity(rounds: list[dict], skip_first: bool = False) -> float | None:
    """Median over rounds of |measured / simulated - 1| (rounds with both figures; ``skip_first``: without round 1,
    which carries the processes' start-up)."""
    ratios = [abs(r["measured_s"] / r["simulated_s"] - 1) for r in rounds
              if r.get("simulated_s") and r.get("measured_s") is not None and not (skip_first and r["round"] == 1)]
    return statistics.median(ratios) if ratios else None


def _figure(strategies: dict[str, dict]) -> Figure:
    fig = Figure(figsize=(10, 4.2))
    by_round, scatter = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    top = 0.0
    for colour, (name, data) in zip(PALETTE * 4, strategies.items()):
        rounds = [r for r in data["rounds"] if r.get("simulated_s") is not None]
        xs = [r["round"] for r in rounds]
        measured, simulated = [r["measured_s"] for r in rounds], [r["simulated_s"] for r in rounds]
        by_round.plot(xs, measured, "o-", color=colour, label=f"{name}: measured")
        by_round.plot(xs, simulated, "x--", color=colour, label=f"{name}: simulated")
        scatter.plot(simulated, measured, "o", color=colour, label=name)
        top = max([top, *measured, *simulated])
    by_round.set_xlabel("round")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.set_ylabel("round latency (s of the fleet's time)")
    by_round.legend(fontsize=7)
    scatter.plot([0, top * 1.05], [0, top * 1.05], ":", color="grey", label="measured = simulated")
    scatter.set_xlabel("simulated (s)")
    scatter.set_ylabel("measured (s)")
    scatter.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_testbed_report(result: dict, out_dir: str | Path) -> Path:
    """``testbed.png`` and ``testbed.md`` for a testbed's ``result`` (what ``testbed.json`` holds); the page's path."""
    out_dir = Path(out_dir)
    strategies = result["strategies"]
    fig = _figure(strategies)
    FigureCanvasAgg(fig)
    fig.savefig(out_dir / "testbed.png", dpi=120)
    rows = [[name, len(d["rounds"]), _pct(fidelity(d["rounds"])), _pct(fidelity(d["rounds"], skip_first=True)),
             _s(d["peak_measured_s"]), _s(d["peak_simulated_s"]), "-" if d["accuracy"] is None else f"{d['accuracy']:.3f}"]
            for name, d in strategies.items()]
    host, emulation = result["host"], result["emulation"]
    lines = [
        "# SmartSplit testbed", "",
        f"Host: {host['cpu']}, {host['cores']} cores, Linux {host['kernel']}"
        f"{'' if host['root'] else ' (not root)'}; one core trains this model at {host['core_gflops']:.1f} GFLOP/s "
        f"(measured). Time scale: {result['time_scale']:.3g} wall seconds per second of the fleet's time.", "",
        "| resource | emulated by |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in emulation.items()], "",
        markdown_table(["strategy", "rounds", "median abs(measured/simulated - 1)", "same, rounds 2+",
                        "peak measured s", "peak simulated s", "accuracy"], rows), "",
        "![measured against simulated](testbed.png)", "",
        "*Measured*: the wall-clock latency of each round of a free-running deployment (devices as processes under the "
        "resources above, the edge serving steps as they arrive), divided by the time scale. *Simulated*: the clock "
        "model's prediction for the same devices at the same cuts (the largest `predicted_round_s` of the round's "
        "decision, edge queue aside), with the edge's speed set to what its process gets here. A device's clock starts "
        "once it answers (its process's launch and welcome are not counted), but round 1 still carries what each "
        "device does once: its first steps' allocations and code paths, run under its CPU quota.", "",
    ]
    terms = _terms(strategies)
    if terms:
        kernel = "namespace" in emulation.get("network", "")
        link = ("the link layer's waits (with links shaped by the kernel, only their latency: the transfers' own "
                "time is then in the rest)" if kernel else "the emulated link (transfers and latency)")
        lines += ["Where the time went in each strategy's slowest device (mean over rounds, seconds of the fleet's "
                  f"time, measured): {link}, the edge queue, pauses for memory, and the rest (computing on the "
                  "device and the edge, and the calls between them).", "",
                  markdown_table(["strategy", "link", "edge queue", "paused", "rest", "simulated round"], terms), ""]
    page = out_dir / "testbed.md"
    page.write_text("\n".join(lines))
    return page


def _terms(strategies: dict[str, dict]) -> list[list[object]]:
    rows = []
    for name, data in strategies.items():
        slowest = [r["slowest"] for r in data["rounds"] if r.get("slowest")]
        if not slowest:
            continue
        mean = {k: statistics.fmean(s[k] for s in slowest) for k in ("comm_s", "wait_s", "paused_s", "finish_s")}
        rest = mean["finish_s"] - mean["comm_s"] - mean["wait_s"] - mean["paused_s"]
        simulated = statistics.fmean(r["simulated_s"] for r in data["rounds"] if r.get("simulated_s"))
        rows.append([name, _s(mean["comm_s"]), _s(mean["wait_s"]), _s(mean["paused_s"]), _s(rest), _s(simulated)])
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
