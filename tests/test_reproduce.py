"""``smartsplit reproduce``: every claim's section on the page, its figures those of the run folders, the machine.

The suite runs once (module fixture) with the private tiny preset: every section, a few seconds a run.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import pytest
import torch

from smartsplit import reproduce as rp
from smartsplit.cli import main


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[str, Path]:
    from smartsplit.meter.heap import MeterUnavailable, shim_path

    try:
        shim_path()
    except MeterUnavailable as e:
        pytest.skip(f"the memory meter cannot run here: {e}")
    out = tmp_path_factory.mktemp("reproduce")
    path = rp.reproduce(out, rp._TINY, workers=1, command="smartsplit reproduce (tiny preset)")
    return path.read_text(), out


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose first header is ``first_header``, as {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def section(text: str, number: int) -> str:
    return text.split(f"\n## {number}. ")[1].split("\n## ")[0]


def summary(out: Path, run: str) -> dict:
    return json.loads((out / "runs" / run / "summary.json").read_text())


def mean_std(text: str) -> tuple[float, float]:
    mean, std = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)", text).groups()
    return float(mean), float(std)


def test_the_page_has_every_claim_its_verdict_and_the_total_wall_time(suite) -> None:
    text, out = suite
    for number, (key, claim) in enumerate(rp.CLAIMS.items(), 1):
        body = section(text, number)
        assert f"**The paper:** {claim}." in body, key
        assert re.search(r"\*\*Verdict:\*\* (meets|exceeds|falls short|partly meets|only)", body), key
        assert re.search(r"Section wall time: \d+ s\.", body), key
    assert re.search(r"\*\*Total wall time: \d+ s \([\d.]+ min\)\*\*", text)
    assert "**Mode: tiny.**" in text and rp._TINY.reduced[0] in text
    headline = table(text, "claim")
    assert [row["the paper"] for row in headline] == list(rp.CLAIMS.values())
    for name in ("memory.png", "latency-vgg.png", "latency-fmnist.png", "accuracy.png", "dynamic-memory.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in text


def test_the_memory_table_is_the_meters_figures(suite) -> None:
    text, _ = suite
    [row] = table(section(text, 1), "model")
    assert row["model"] == rp._TINY.memory_models[0] and row["width"] == f"{rp._TINY.memory_width:g}"
    whole, budget = float(row["(a) whole-model peak MB (meter)"]), float(row["budget MB = (a)/10"])
    device = float(row["(b) device peak MB (meter)"])
    assert budget == pytest.approx(whole / 10, abs=2e-3)
    assert float(row["(a)/(b)"].rstrip("x")) == pytest.approx(whole / device, abs=0.06)
    assert row["within budget"] == ("yes" if device <= budget else "NO")


def test_latency_figures_are_the_run_folders(suite) -> None:
    text, out = suite
    rows = table(section(text, 2), "config")
    assert {(r["config"], r["strategy"]) for r in rows} == {
        (f"{c}.yaml", s) for c in ("latency-vgg", "fmnist") for s in rp._TINY.latency_strategies}
    for row in rows:
        prefix = "latency-" + row["config"].removesuffix(".yaml").removeprefix("latency-")
        peak = summary(out, f"{prefix}-{row['strategy']}")["peak_round_latency_s"]
        assert float(row["peak round latency s (simulated)"]) == pytest.approx(peak, abs=1e-3)
        if row["strategy"] != "smartsplit":
            ours = summary(out, f"{prefix}-smartsplit")["peak_round_latency_s"]
            number, word = re.fullmatch(r"([\d.]+)% (lower|higher)", row["SmartSplit's peak latency vs this strategy"]).groups()
            assert float(number) * (1 if word == "lower" else -1) == pytest.approx(100 * (1 - ours / peak), abs=0.06)
    assert "**These latencies are simulated**" in section(text, 2)


def test_the_latency_section_measures_on_the_emulated_testbed(suite) -> None:
    """The testbed's part: its table is testbed.json's figures, and the verdict says what was measured."""
    text, out = suite
    part = section(text, 2).split("### Measured on an emulated testbed")[1]
    result = json.loads((out / "testbed" / "testbed.json").read_text())
    rows = {r["strategy"]: r for r in table(part, "strategy")}
    assert set(rows) == {"smartsplit", "fedavg"} == set(result["strategies"])
    for name, row in rows.items():
        data = result["strategies"][name]
        assert float(row["peak measured s"]) == pytest.approx(data["peak_measured_s"], abs=0.006)
        assert float(row["peak simulated s"]) == pytest.approx(data["peak_simulated_s"], abs=0.006)
    assert "Measured on this machine's emulated testbed: SmartSplit's peak round latency is" in section(text, 2)
    assert (out / "testbed" / "testbed.png").exists() and result["emulation"]["network"] in part


def test_accuracy_figures_are_the_run_folders_over_seeds(suite) -> None:
    text, out = suite
    rows = {r["strategy"]: r for r in table(section(text, 3), "alpha")}
    assert set(rows) == set(rp._TINY.accuracy_strategies)
    means = {}
    for strategy, row in rows.items():
        accs = [100 * summary(out, f"accuracy-alpha0.1-{strategy}-s{seed}")["final_accuracy"]
                for seed in rp._TINY.accuracy_seeds]
        mean, std = mean_std(row["final accuracy, % (mean ± sample std)"])
        assert int(row["seeds"]) == len(accs) and mean == pytest.approx(sum(accs) / len(accs), abs=0.006)
        assert std == pytest.approx((sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5, abs=0.01)
        means[strategy] = sum(accs) / len(accs)
    gain = float(re.match(r"[+-][\d.]+", rows["fedavg"]["SmartSplit's gain, points"]).group())
    assert gain == pytest.approx(means["smartsplit"] - means["fedavg"], abs=0.006)
    assert "--seeds 0,1" in text and "`data.alpha=0.1`" in text  # the command and its overrides


def test_dynamic_counts_are_the_run_folders(suite) -> None:
    text, out = suite
    rows = table(section(text, 4), "strategy")  # the section's first table: its claim's
    assert [r["strategy"] for r in rows] == list(rp._TINY.dynamic_strategies)
    for row in rows:
        saved = summary(out, f"dynamic-{row['strategy']}")
        assert int(row["out-of-memory events"]) == saved["oom_events"] and int(row["pauses"]) == saved["pauses"]
        assert int(row["cut moves"]) == saved["cut_moves"] and int(row["re-plans"]) == saved["replans"]
        assert mean_std(row["final accuracy, % (mean ± sample std)"])[0] == pytest.approx(100 * saved["final_accuracy"], abs=0.006)


def test_the_machine_block(suite) -> None:
    text, _ = suite
    block = text.split("## Machine")[1].split("\n## ")[0]
    machine = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", block, flags=re.M))
    assert machine["torch"] == torch.__version__
    assert machine["torch.backends.cpu.get_cpu_capability()"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cores"].startswith(f"{os.cpu_count()} (")
    assert machine["platform"] == platform.platform() and machine["CPU"]


def test_finished_runs_are_reused_and_changed_ones_are_not(suite) -> None:
    _, out = suite
    suite_ = rp.Suite(rp.configs_dir() / "fmnist-dynamic.yaml", "dynamic", rp._TINY.dynamic_strategies,
                      rp._TINY.dynamic_seeds, rp._TINY.dynamic_overrides)
    stamp = (out / "runs" / "dynamic-smartsplit" / "summary.json").stat().st_mtime_ns
    result = rp.run_suite(suite_, out / "runs", workers=1, progress=False)
    assert result.reused == ["dynamic-fedavg", "dynamic-smartsplit"]
    assert (out / "runs" / "dynamic-smartsplit" / "summary.json").stat().st_mtime_ns == stamp
    assert "Reused" in rp.how_it_ran(result)
    longer = rp.Suite(suite_.config, "dynamic", suite_.strategies, suite_.seeds, (*suite_.overrides, "training.rounds=3"))
    assert not any(rp.finished(config) for _, config in rp.suite_configs(longer, out / "runs"))


def test_verdicts_say_plainly_where_the_project_falls_short() -> None:
    assert rp.latency_verdict({("a.yaml", "fedavg"): 50.0, ("b.yaml", "fedavg"): -10.0})[0] == "falls short"
    assert rp.latency_verdict({("a.yaml", "fedavg"): 97.0})[0] == "exceeds"
    assert rp.accuracy_verdict({(0.1, "fedavg"): 3.0, (0.1, "oort"): -0.5})[0] == "falls short"
    assert rp.accuracy_verdict({(0.1, "fedavg"): 3.0, (0.5, "oort"): 2.0})[0] == "partly meets"
    assert rp.accuracy_verdict({(0.1, "fedavg"): 60.0})[0] == "meets"


def test_a_quick_page_names_its_reduced_settings(tmp_path: Path) -> None:
    ctx = rp.Context(tmp_path, tmp_path / "runs", rp.configs_dir(), rp.QUICK, 2, False)
    text = rp.page(ctx, [], [["torch", torch.__version__]], "smartsplit reproduce --quick --out X", 5.0, complete=False)
    assert "**Mode: quick.**" in text and "**Incomplete:**" in text
    for line in rp.QUICK.reduced:
        assert f"- {line}" in text
    assert "width 0.5" in text and "5 rounds" in text


def test_reproduce_help_through_the_cli(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["reproduce", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "--quick" in help_text and "--out DIR" in help_text and "--workers N" in help_text
    assert main(["reproduce", "--out", str(tmp_path), "--workers", "0", "--quiet"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
