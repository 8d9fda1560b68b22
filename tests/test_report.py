"""The markdown report: figures from fake run folders, the summary table, errors for bad folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import matplotlib
import pytest
import yaml

from smartsplit.errors import SmartSplitError
from smartsplit.reports.report import FIGURES, fig_recompute, load_run, write_report
from smartsplit.reports.summary import SUMMARY_HEADERS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, strategy: str, seed: int, rounds: int = 4, recompute: bool = False, oom_round: int | None = None,
             cut: int | None = None) -> Path:
    """A run folder shaped like the embedded runtime's output, with made-up numbers."""
    run = root / f"{strategy}-{seed}"
    run.mkdir(parents=True)
    config = {"name": run.name, "seed": seed, "fleet": {"devices": 6}, "strategy": {"name": strategy, "cut": cut}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for r in range(rounds):
        devices = []
        for d in range(3):
            dev_cut = (d % 3) + 1 if strategy == "smartsplit" else 3
            device = {
                "device": d, "class": "wearable", "cut": dev_cut, "budget_mb": 10.0 * (d + 1),
                "peak_predicted_mb": 5.0 + d + dev_cut, "peak_measured_mb": 5.0 + d + dev_cut + 0.1 * seed,
                "oom_events": int(oom_round == r and d == 0), "steps": 5, "samples": 40, "loss": 1.0,
                "compute_s": 1.0 + d, "comm_s": 2.0, "wait_s": 0.0, "finish_s": 3.0 + d + r,
                "bytes_up": 1_000_000 * dev_cut, "bytes_down": 1_000_000 * dev_cut,
            }
            if recompute:
                device["recompute_s"] = 0.5 * d + 0.1 * r
            devices.append(device)
        lines.append({
            "round": r + 1, "accuracy": 0.3 + 0.1 * r + 0.02 * seed, "loss": 2.0 - 0.2 * r,
            "participants": 3, "excluded": 1 if strategy == "fedavg" else 0,
            "cuts": [d["cut"] for d in devices], "oom_events": sum(d["oom_events"] for d in devices),
            "peak_predicted_mb": [d["peak_predicted_mb"] for d in devices],
            "peak_measured_mb": [d["peak_measured_mb"] for d in devices],
            "bytes_up": sum(d["bytes_up"] for d in devices), "bytes_down": sum(d["bytes_down"] for d in devices),
            "latency_s": max(d["finish_s"] for d in devices) + seed, "wall_s": 0.01, "devices": devices,
        })
        if strategy == "smartsplit":
            lines[-1]["unit_importance"] = {str(u): (0.2 * u + 0.1 * r) % 1.0 for u in (1, 2, 3)}
            lines[-1]["mec_moves"] = {"deeper": r % 2, "shallower": (r + 1) % 2}
    (run / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        fake_run(tmp_path / "runs", "fedavg", 0),
        fake_run(tmp_path / "runs", "fedavg", 1, rounds=3),  # seeds of unequal length
        fake_run(tmp_path / "runs", "smartsplit", 0, recompute=True, oom_round=2),
        fake_run(tmp_path / "runs", "smartsplit", 1, recompute=True),
    ]


def test_report_writes_every_figure_and_the_table(runs: list[Path], tmp_path: Path) -> None:
    before = dict(matplotlib.rcParams)
    report = write_report(runs, tmp_path / "report")
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    for filename, _, _ in FIGURES:
        png = report.parent / filename
        width, height = png_size(png)
        assert width >= 600 and height >= 400 and png.stat().st_size > 10_000, filename
        assert f"]({filename})" in text
    assert len(FIGURES) == 8
    summary = text.split("## Figures")[0]
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    assert {"fedavg", "smartsplit"} <= rows.keys()
    headers = [c.strip() for c in rows["strategy"].split("|")[1:-1]]
    assert headers == list(SUMMARY_HEADERS)  # the same table as the console's and compare --markdown's
    fedavg = [c.strip() for c in rows["fedavg"].split("|")[1:-1]]
    assert fedavg[1] == "2"  # two seeds in one group
    assert fedavg[2] == "0.560 ± 0.057"  # final accuracy: 0.6 (4 rounds, seed 0) and 0.52 (3 rounds, seed 1)
    assert fedavg[7] == "83%"  # one of six devices excluded each round
    smartsplit = [c.strip() for c in rows["smartsplit"].split("|")[1:-1]]
    assert smartsplit[8] == "10.100"  # max measured device peak: 5 + device 2 + cut 3 + 0.1 * seed 1
    assert smartsplit[9] == "1"  # OOM events over all seeds
    assert dict(matplotlib.rcParams) == before


def test_strategies_with_a_fixed_cut_are_told_apart(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "a", "splitfed", 0, cut=1), fake_run(tmp_path / "b", "splitfed", 0, cut=2)]
    text = write_report(runs, tmp_path / "report").read_text()
    assert "| splitfed (cut=1) |" in text and "| splitfed (cut=2) |" in text


def test_recompute_figure_notes_when_nothing_is_recorded(tmp_path: Path) -> None:
    run = load_run(fake_run(tmp_path, "fedavg", 0))
    fig = fig_recompute({"fedavg": [run]}, {"fedavg": "C0"})
    assert any("no recompute recorded" in t.get_text() for t in fig.axes[0].texts)


def test_missing_keys_are_tolerated(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "runs", "fedavg", 0)
    old = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in old:
        for key in ("devices", "bytes_up", "peak_measured_mb", "excluded"):
            rec.pop(key)
    (run / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in old))
    report = write_report([run], tmp_path / "report")
    assert "| fedavg |" in report.read_text()


def test_a_half_written_last_line_is_skipped(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "fedavg", 0)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 5, "accur')
    assert len(load_run(run).records) == 4


@pytest.mark.parametrize("damage", ["no folder", "no metrics", "bad line", "empty"])
def test_bad_run_folders_raise_naming_the_path(tmp_path: Path, damage: str) -> None:
    run = fake_run(tmp_path, "fedavg", 0)
    metrics = run / "metrics.jsonl"
    if damage == "no folder":
        run = tmp_path / "nowhere"
    elif damage == "no metrics":
        metrics.unlink()
    elif damage == "bad line":
        metrics.write_text("not json\n" + metrics.read_text())
    else:
        metrics.write_text("")
    with pytest.raises(SmartSplitError, match=str(run)):
        write_report([run], tmp_path / "report")


def test_no_runs_raises(tmp_path: Path) -> None:
    with pytest.raises(SmartSplitError):
        write_report([], tmp_path / "report")
