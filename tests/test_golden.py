"""The shipped configs and every strategy give the metrics they gave before the engine was split into roles.

``tests/golden/shipped-configs.json`` holds, for every config in ``configs/`` (and every strategy on
``configs/fmnist.yaml``, and runs whose budgets swing hard or whose devices come and go), the metrics and
decisions of a small run (2 rounds, 12 devices) made with the memory meter off, so that plans rest on saved-tensor sizes alone and do not depend on the machine's allocator. On the
machine kind the file was written on (same torch, CPU architecture and kernel capability) every figure must be
equal, bit for bit; elsewhere floating-point kernels may round differently, so floats are compared to a
tolerance (0.1%, or 0.01 absolute: a test example or two) and everything else exactly.

Regenerate (only when a deliberate change alters results, and say so in the commit):
``python tests/test_golden.py --write``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import pytest
import torch

from smartsplit.config import load_config
from smartsplit.data.datasets import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "shipped-configs.json"
SMALL = ["training.rounds=2", "fleet.devices=12", "training.devices_per_round=4", "training.local_steps=3",
         "data.test_limit=300", "data.train_limit=3000"]
STRATEGIES = ["fedavg", "fedavg-ckpt", "splitfed", "splitfed-v1", "splitfed-v2", "latency-only", "oort",
              "smartsplit-no-selection", "smartsplit-no-finetuning", "smartsplit-no-ckpt"]


def fingerprint() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# Budgets that swing hard (re-plans and pauses) and devices that come and go (drop-outs, offline devices)
SQUEEZED = ["fleet.budgets.mean_gap_s=0.5", "fleet.budgets.mean_hold_s=1", "fleet.budgets.max_take=0.95",
            "fleet.budgets.floor=0.01"]
ON_OFF = ["fleet.availability.kind=on_off", "fleet.availability.mean_on_s=8", "fleet.availability.mean_off_s=4"]


def jobs() -> list[tuple[str, str, list[str]]]:
    """(key, config file, overrides) of every golden run."""
    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        overrides = list(SMALL)
        if path.stem == "latency-vgg":  # synthetic data: smaller sets instead of limits
            overrides = [o for o in overrides if not o.startswith("data.")] + ["data.synthetic_train=600", "data.synthetic_test=100"]
        out.append((f"{path.stem}/smartsplit", path.name, overrides))
    out += [(f"fmnist/{s}", "fmnist.yaml", SMALL + [f"strategy.name={s}"]) for s in STRATEGIES]
    out += [(f"fmnist-dynamic/{s}+squeezed", "fmnist-dynamic.yaml", SMALL + SQUEEZED + [f"strategy.name={s}"])
            for s in ("smartsplit", "fedavg-ckpt")]
    out += [(f"fmnist/{s}+on-off", "fmnist.yaml", SMALL + ON_OFF + [f"strategy.name={s}"]) for s in ("smartsplit", "splitfed-v1")]
    return out


def run_small(config_name: str, overrides: list[str], run_dir: Path, monkeypatch) -> dict:
    import smartsplit.engine.experiment as experiment
    from smartsplit.runtime.embedded import run_experiment

    monkeypatch.setattr(experiment, "start_meter", lambda threads: None)
    config = load_config(ROOT / "configs" / config_name, overrides)
    run_experiment(config, run_dir, progress=False)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        record.pop("wall_s", None)
    decisions = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    return {"overrides": overrides, "metrics": metrics, "decisions": decisions}


def assert_same(got, want, exact: bool, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], exact, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, exact, f"{where}[{i}]")
    elif isinstance(want, float) and not exact:
        # another CPU kind may round a logit differently: one or two of the 300 test examples may flip
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-2), f"{where}: {got} != {want}"
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed (`bash scripts/install-data.sh`)")
@pytest.mark.parametrize("key,config_name,overrides", jobs(), ids=[key for key, _, _ in jobs()])
def test_shipped_configs_give_the_golden_metrics(key, config_name, overrides, tmp_path, monkeypatch):
    golden = json.loads(GOLDEN.read_text())
    got = run_small(config_name, overrides, tmp_path / "run", monkeypatch)
    assert key in golden["runs"], f"{key}: no golden run; regenerate with `python tests/test_golden.py --write`"
    exact = golden["fingerprint"] == fingerprint()
    assert_same(got, golden["runs"][key], exact, key)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    class _Patch:
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    runs = {}
    for key, name, overrides in jobs():
        with tempfile.TemporaryDirectory() as d:
            runs[key] = run = run_small(name, overrides, Path(d) / "run", _Patch())
        print(key, [r["accuracy"] for r in run["metrics"]], flush=True)
    GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(), "runs": runs}, sort_keys=True))
