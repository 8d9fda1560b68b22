"""Seeded random mutations of the shipped configs, in the file and through --set: never a traceback.

Each mutated config goes through ``smartsplit check`` (validation, then data, model, fleet and traces built as a
run would build them). The answer is exit code 0, or exit code 2 with one line that names the mutated field.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from smartsplit.cli import main
from smartsplit.data.datasets import FASHION_MNIST_ROOT

# most shipped configs train on Fashion-MNIST, and `check` loads the data they name
pytestmark = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed "
                                "(`bash scripts/install-data.sh`)")

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
BAD_VALUES = [-1, 0, 0.5, 10**12, "x", "../x", None, [], {}, True, [1, 2], {"a": 1}, "1e999", -0.0]


def leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def mutations(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        source = CONFIGS[rng.integers(len(CONFIGS))]
        raw = yaml.safe_load(source.read_text())
        kind = rng.choice(["value", "value", "unknown", "delete"])
        path = leaves(raw)[rng.integers(len(leaves(raw)))]
        if kind == "value":
            value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
            set_path(raw, path, value)
        elif kind == "unknown":
            path = (*path[:-1], "no_such_field")
            set_path(raw, path, 1)
        else:
            parent = raw
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        yield source.name, kind, path, raw


def check(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["check", *args])
    return code, err.getvalue()


def test_mutated_config_files_fail_in_one_line_naming_the_field(tmp_path: Path) -> None:
    failures = 0
    for name, kind, path, raw in mutations(0, 14):
        raw["output_dir"] = str(tmp_path / "runs")
        file = tmp_path / name
        file.write_text(yaml.safe_dump(raw))
        code, err = check(str(file))
        assert code in (0, 2), f"{name} {kind} {path}: exit {code}"
        if code == 2:
            failures += 1
            assert err.startswith("error: ") and err.count("\n") == 1, f"{name} {kind} {path}: {err!r}"
            assert any(str(key) in err for key in path[-2:]), f"{name} {kind} {path}: {err!r}"  # the field or its own section
    assert failures >= 5  # the mutations are mostly bad: a check that let them all through would fail here


def test_mutated_set_overrides_fail_in_one_line_naming_the_field(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    source = CONFIGS[0]
    paths = leaves(yaml.safe_load(source.read_text()))
    refused = 0
    for _ in range(8):
        path = paths[rng.integers(len(paths))]
        value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        key = ".".join(map(str, path))
        code, err = check(str(source), "--set", f"output_dir={tmp_path}", "--set", f"{key}={json.dumps(value)}")
        assert code in (0, 2), f"--set {key}={value!r}: exit {code}"
        if code == 2:
            refused += 1
            assert err.count("\n") == 1 and path[-1] in err, f"--set {key}={value!r}: {err!r}"
    for bad in ["=3", "training.rounds", "training.rounds.x=1", "nosuch=1", "training.rounds=[1"]:
        code, err = check(str(source), "--set", bad)
        assert code == 2 and err.count("\n") == 1, f"--set {bad}: {err!r}"
    assert refused >= 4
