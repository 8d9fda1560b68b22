"""The public API and plug-ins: a strategy, a data set and a partitioner named in YAML run end to end; the
same run from Python with a strategy object gives the same metrics; the README's example runs as printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from smartsplit.cli import main
from smartsplit.data.datasets import FASHION_MNIST_ROOT
from smartsplit.errors import SmartSplitError

ROOT = Path(__file__).resolve().parent.parent
PLUGGED = {
    "name": "plugged",
    "seed": 5,
    "data": {"dataset": "plugin_examples:tensor_data", "partition": "plugin_examples:round_robin"},
    "model": {"name": "user_models:tiny_residual"},
    "fleet": {"devices": 6, "classes": {"wearable": 1.0}},
    "training": {"rounds": 2, "devices_per_round": 3, "local_steps": 2, "batch_size": 8},
    "strategy": {"name": "plugin_examples:first_fit"},
}


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_public_names_import_from_the_package() -> None:
    import smartsplit
    from smartsplit import Config, Experiment, Strategy, compare, run  # noqa: F401

    assert callable(run) and callable(compare) and isinstance(smartsplit.__version__, str)
    with pytest.raises(AttributeError):
        smartsplit.no_such_name  # noqa: B018


def test_plugin_strategy_dataset_and_partitioner_named_in_yaml_run_end_to_end(tmp_path: Path, capsys) -> None:
    path = tmp_path / "plugged.yaml"
    path.write_text(yaml.safe_dump({**PLUGGED, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(path), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "plugged"
    metrics, decisions = lines(run_dir / "metrics.jsonl"), lines(run_dir / "decisions.jsonl")
    assert [m["round"] for m in metrics] == [1, 2] and all(0 <= m["accuracy"] <= 1 for m in metrics)
    # the plug-in strategy decided: the three lowest-numbered devices, its notes in decisions.jsonl
    assert all(d["strategy"] == "deepest-fit" and d["seed"] == 5 and d["num_units"] >= 3 for d in decisions)
    assert [a["device"] for a in decisions[0]["assignments"]] == [0, 1, 2]
    assert all(a["cut"] == max(a["feasible_cuts"]) for d in decisions for a in d["assignments"])
    # and learned across rounds, which the saved state keeps for a resume
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert state["strategy"] == {"seen": [0, 1, 2, 0, 1, 2]}
    # the final global model is a plain state dict
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())
    assert torch.equal(model[next(iter(model))], state["model"][next(iter(model))])
    assert "final accuracy" in capsys.readouterr().out


def test_verbose_and_quiet(tmp_path: Path, capsys) -> None:
    path = tmp_path / "plugged.yaml"
    path.write_text(yaml.safe_dump({**PLUGGED, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(path), "--verbose", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "DEBUG plugged round 1: accuracy" in err and "DEBUG plugged round 2: accuracy" in err
    assert "INFO plugged: deepest-fit on user_models:tiny_residual, 6 devices, rounds 1..2" in err
    assert main(["run", str(path), "--quiet", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "final accuracy" in captured.out


def test_a_strategy_object_from_python_gives_the_yaml_plugins_metrics(tmp_path: Path) -> None:
    import plugin_examples

    from smartsplit import compare, run
    from smartsplit.config import build_config

    config = build_config({**PLUGGED, "output_dir": str(tmp_path)})
    by_name = run(config, run_dir=tmp_path / "by-name")
    by_object = run(config, strategy=plugin_examples.first_fit(num_units=5, seed=5), run_dir=tmp_path / "by-object")
    assert by_name.strategy == "plugin_examples:first_fit" and by_object.strategy == "deepest-fit"
    a, b = lines(tmp_path / "by-name" / "metrics.jsonl"), lines(tmp_path / "by-object" / "metrics.jsonl")
    for record in a + b:
        record.pop("wall_s")
    assert a == b and by_name.final_accuracy == by_object.final_accuracy
    # compare names a plug-in's runs by its factory and puts them in the one table and report
    summaries = compare(config, ["plugin_examples:first_fit", "fedavg"], workers=1)
    assert [Path(s.run_dir).name for s in summaries] == ["plugged-first_fit", "plugged-fedavg"]
    assert (tmp_path / "plugged-report" / "report.md").is_file()


def test_bad_plugin_strategies_are_clear_errors() -> None:
    from smartsplit.config import build_config
    from smartsplit.engine.experiment import Experiment

    for name, message in [("plugin_examples:not_a_strategy", "returned int, not a smartsplit.Strategy"),
                          ("plugin_examples:no_such", "cannot import 'no_such'"),
                          ("nope", "unknown strategy 'nope'")]:
        with pytest.raises(SmartSplitError, match=re.escape(message)):
            Experiment(build_config({**PLUGGED, "strategy": {"name": name}}))


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed (`bash scripts/install-data.sh`)")
def test_the_readme_example_runs_as_printed(tmp_path: Path, monkeypatch, capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- example: custom strategy -->\s*```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    monkeypatch.chdir(ROOT)
    code = code.replace('"name=', f'"output_dir={tmp_path}", "name=')  # its run folder: a temporary one
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"round 2: mean loss \d", out) and re.search(r"^0\.\d+ ", out.splitlines()[-1])


def test_a_run_of_a_strategy_object_resumes_exactly(tmp_path: Path) -> None:
    import plugin_examples

    from smartsplit import run
    from smartsplit.config import build_config

    config = build_config({**PLUGGED, "output_dir": str(tmp_path), "training": {**PLUGGED["training"], "rounds": 3}})
    whole = run(config, strategy=plugin_examples.first_fit(num_units=5, seed=5), run_dir=tmp_path / "whole")
    two = build_config({**PLUGGED, "output_dir": str(tmp_path)})
    run(two, strategy=plugin_examples.first_fit(num_units=5, seed=5), run_dir=tmp_path / "resumed")
    resumed = run(config, strategy=plugin_examples.first_fit(num_units=5, seed=5), run_dir=tmp_path / "resumed", resume=True)
    a, b = lines(tmp_path / "whole" / "metrics.jsonl"), lines(tmp_path / "resumed" / "metrics.jsonl")
    for record in a + b:
        record.pop("wall_s")
    assert a == b and resumed.rounds == whole.rounds == 3
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert state["strategy"] == {"seen": [0, 1, 2] * 3}  # what it learned before the resume was given back
