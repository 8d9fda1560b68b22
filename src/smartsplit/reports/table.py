"""Plain-text tables for the console and markdown."""

from __future__ import annotations

from typing import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


COMPARE_HEADERS = (
    "strategy", "seeds", "final acc", "rounds to target", "sim s to target", "mean latency s", "peak latency s",
    "participation", "max peak MB", "OOM", "pauses", "drop-outs",
)


def compare_rows(summaries: Sequence[dict]) -> list[list[object]]:
    """One row per strategy, over its seeds: mean ± spread, and time to the target accuracy where reached."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["strategy"], []).append(s)
    rows = []
    for name, runs in groups.items():
        reached = [r["to_target"] for r in runs if r.get("to_target")]
        rows.append(
            [
                name,
                len(runs),
                _spread([r["final_accuracy"] for r in runs], "{:.3f}"),
                _spread([t["round"] for t in reached], "{:.1f}") + ("" if len(reached) == len(runs) else f" ({len(reached)}/{len(runs)})"),
                _spread([t["clock_s"] for t in reached], "{:.0f}") if reached else "-",
                _spread([r["mean_round_latency_s"] for r in runs], "{:.1f}"),
                max(r["peak_round_latency_s"] for r in runs),
                f"{100 * _mean([r['participation_rate'] for r in runs]):.0f}%",
                max(r["max_peak_measured_mb"] for r in runs),
                sum(r["oom_events"] for r in runs),
                sum(r.get("pauses", 0) for r in runs),
                sum(r.get("dropouts", 0) for r in runs),
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


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
