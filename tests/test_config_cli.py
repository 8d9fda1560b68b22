"""Config validation errors and the command line, end to end (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smartsplit.config import Config, build_config, load_config, parse_overrides
from smartsplit.errors import SmartSplitError

TINY = {
    "name": "tiny",
    "seed": 1,
    "data": {"dataset": "synthetic", "synthetic_train": 60, "synthetic_test": 20},
    "model": {"name": "cnn", "width": 0.25},
    "fleet": {"devices": 4, "classes": {"phone-entry": 0.5, "wearable": 0.5}},
    "training": {"rounds": 3, "devices_per_round": 2, "local_steps": 2, "batch_size": 8, "eval_batch_size": 64},
}

METRIC_KEYS = {
    "round", "accuracy", "loss", "participants", "excluded", "cuts", "peak_predicted_mb", "peak_measured_mb",
    "bytes_up", "bytes_down", "latency_s", "wall_s",
}


def write_config(folder: Path, **top) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(folder / "runs"), **top}, sort_keys=False))
    return path


def cli(*args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}  # tiny tensors: one thread is much faster on a busy box
    return subprocess.run([sys.executable, "-m", "smartsplit.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


# --------------------------------------------------------------------------- config errors


def test_defaults_and_round_trip() -> None:
    c = build_config({})
    assert isinstance(c, Config) and c.training.rounds == 20 and c.strategy.name == "smartsplit"
    assert build_config(yaml.safe_load(c.to_yaml())) == c


def test_unknown_field_names_its_path() -> None:
    with pytest.raises(SmartSplitError, match=r"training\.roundz") as info:
        build_config({"training": {"roundz": 3}}, source="my.yaml")
    assert str(info.value).startswith("my.yaml:")
    with pytest.raises(SmartSplitError, match="modle"):
        build_config({"modle": {"name": "cnn"}})


def test_negative_rounds() -> None:
    with pytest.raises(SmartSplitError, match=r"training\.rounds"):
        build_config({"training": {"rounds": -1}})
    with pytest.raises(SmartSplitError, match=r"training\.rounds"):
        build_config({}, ["training.rounds=0"])


def test_wrong_type() -> None:
    with pytest.raises(SmartSplitError, match=r"training\.batch_size"):
        build_config({"training": {"batch_size": "lots"}})
    with pytest.raises(SmartSplitError, match=r"data\.dataset"):
        build_config({"data": {"dataset": "imagenet"}})
    with pytest.raises(SmartSplitError, match=r"training"):
        build_config({"training": 5})


def test_set_overrides() -> None:
    assert parse_overrides(["training.lr=0.5", "fleet.classes={wearable: 1}"]) == [
        ("training.lr", 0.5), ("fleet.classes", {"wearable": 1})
    ]
    c = build_config({"training": {"rounds": 4}}, ["training.rounds=7", "model.width=0.5", "name=x"])
    assert (c.training.rounds, c.model.width, c.name) == (7, 0.5, "x")
    for bad in ["training.rounds", "=5", "training.lr=[1, 2"]:
        with pytest.raises(SmartSplitError, match="--set"):
            build_config({}, [bad])
    with pytest.raises(SmartSplitError, match="not a section"):
        build_config({"name": "run"}, ["name.first=1"])
    with pytest.raises(SmartSplitError, match="name"):  # not in the file: still rejected, naming the field
        build_config({}, ["name.first=1"])
    with pytest.raises(SmartSplitError, match=r"training\.lrr"):
        build_config({}, ["training.lrr=0.1"])


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SmartSplitError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SmartSplitError, match="expected a mapping"):
        load_config(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: {rounds: 3\n")
    with pytest.raises(SmartSplitError, match="not valid YAML"):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SmartSplitError, match="the config is empty"):
        load_config(empty)  # an empty file is a mistake, not a request for every default
    assert load_config(write_config(tmp_path), ["training.rounds=2"]).training.rounds == 2


# --------------------------------------------------------------------------- CLI, end to end


def test_cli_run_writes_results(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    proc = cli("run", str(cfg), "--quiet", "--out", str(out), "--set", "training.rounds=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["rounds"] == 2  # the override is applied
    assert resolved["edge"]["gflops"] == 2000.0  # defaults are filled in
    assert build_config(resolved) == load_config(cfg, ["training.rounds=2"])

    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
        assert r["participants"] == 2 == len(r["cuts"]) == len(r["peak_measured_mb"]) == len(r["peak_predicted_mb"])
        assert all(1 <= c <= 5 for c in r["cuts"])
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["latency_s"] > 0 and r["wall_s"] > 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["name"] == "tiny" and summary["strategy"] == "smartsplit"
    assert summary["final_accuracy"] == records[-1]["accuracy"]
    assert summary["simulated_time_s"] == pytest.approx(sum(r["latency_s"] for r in records))


def test_cli_compare_prints_both_strategies(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, training={**TINY["training"], "rounds": 1})
    proc = cli("compare", str(cfg), "--quiet", "--strategies", "fedavg,smartsplit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert "strategy" in rows and "fedavg" in rows and "smartsplit" in rows
    for name in ("fedavg", "smartsplit"):
        assert (tmp_path / "runs" / f"tiny-{name}" / "summary.json").is_file()
        assert json.loads((tmp_path / "runs" / f"tiny-{name}" / "summary.json").read_text())["strategy"] == name


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = cli("run", str(write_config(tmp_path)), "--quiet", "--set", "training.roundz=3", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "training.roundz" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "training.rounds=-2"], "training.rounds"),
        (["--set", "training.rounds"], "expected key=value"),
        (["--set", "strategy.name=nope"], "unknown strategy"),
        (["--set", "model.name=resnet99"], "resnet99"),
    ],
)
def test_cli_main_bad_config_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    from smartsplit.cli import main

    assert main(["run", str(write_config(tmp_path)), "--quiet", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_missing_config_file(tmp_path: Path) -> None:
    proc = cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_cli_profile_tables(tmp_path: Path) -> None:
    proc = cli("profile", "--model", "cnn", "--batch", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cnn: 5 units") and "batch 4" in lines[0]
    unit_header = next(i for i, line in enumerate(lines) if line.startswith("unit"))
    cut_header = next(i for i, line in enumerate(lines) if line.startswith("cut"))
    assert "params MB" in lines[unit_header] and "predicted peak MB" in lines[cut_header] and "measured peak MB" in lines[cut_header]
    unit_rows = [line.split() for line in lines[unit_header + 2 : unit_header + 7]]
    cut_rows = [line.split() for line in lines[cut_header + 2 : cut_header + 7]]
    assert [r[0] for r in unit_rows] == ["1", "2", "3", "4", "5"]
    assert [r[0] for r in cut_rows] == ["1", "2", "3", "4", "5"]
    predicted, measured = [float(r[1]) for r in cut_rows], [float(r[2]) for r in cut_rows]
    assert predicted == sorted(predicted) and predicted[0] > 0  # deeper cuts hold more on the device
    assert all(p >= m > 0 for p, m in zip(predicted, measured))  # the prediction bounds the meter
    assert float(cut_rows[-1][3]) == 0.0  # at cut = L nothing crosses the link
    assert lines[-1].startswith("measured: heap meter")


def test_cli_console_script_installed() -> None:
    script = Path(sys.executable).parent / "smartsplit"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and all(cmd in proc.stdout for cmd in ("run", "compare", "profile"))


def test_cli_profile_of_your_own_model(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)  # where user_models.py lives, as a user's package would be on the path
    proc = cli("profile", "--model", "user_models:tiny_residual", "--input", "1,28,28", "--batch", "4", "--no-meter",
               cwd=tmp_path, PYTHONPATH=tests)
    missing = cli("profile", "--model", "user_models:tiny_residual", cwd=tmp_path, PYTHONPATH=tests)
    malformed = cli("profile", "--model", "cnn", "--input", "1,28", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("user_models:tiny_residual: 6 units, input (1, 28, 28), batch 4")
    assert missing.returncode != 0 and "--input C,H,W" in missing.stderr and "Traceback" not in missing.stderr
    assert malformed.returncode != 0 and "--input must be C,H,W" in malformed.stderr and "Traceback" not in malformed.stderr
