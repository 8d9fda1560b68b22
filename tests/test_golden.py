"""The shipped configs and every strategy give the metrics and decisions they gave when the golden file was written.

``tests/golden/shipped-configs.json`` holds, for every config in ``configs/`` (and every strategy on
``configs/fmnist.yaml``, and runs whose budgets swing hard or whose devices come and go), the metrics and
decisions of a small run (2 rounds, 12 devices) made with the memory meter off, so that plans rest on exact
saved-tensor sizes and do not depend on the machine's allocator.

How strict, by machine kind. PyTorch, oneDNN, the BLAS and numpy choose their kernels from the CPU, and kernels of
other widths round differently, so floats are bit-for-bit comparable only between processes whose
``smartsplit.machine.kernel_fingerprint()`` (library versions, architecture, the CPU's instruction sets, ATen's
capability, any variable pinning a library) equals the file's. There every figure must be equal, bit for bit.
Elsewhere (another CPU kind, or this one under a forced ``ATEN_CPU_CAPABILITY``) everything that is not a float
(who was selected, every cut, every count, every key) must still be equal, and floats must agree within
``CROSS_KIND``: tolerances sized from the differences measured between four kinds of kernels (an AVX2 host, an
AVX-512 host, and the AVX-512 host forced to ``avx2`` and to ``default``), with a margin. No pinning of
capabilities makes two x86 kinds bit-identical: oneDNN, the BLAS and numpy dispatch by themselves.

``test_golden_runs_hold_under_forced_kernel_capabilities`` runs some of the jobs again under two forced
capabilities, so a golden value that holds only on one kind of kernel fails here, not on a user's machine.

Regenerate (only when a deliberate change alters results, and say so in the commit):
``python tests/test_golden.py --write``. Measure the cross-kind differences that size ``CROSS_KIND``:
``python tests/test_golden.py --dump A.json`` once per kind (e.g. under ``ATEN_CPU_CAPABILITY=avx2``), then
``python tests/test_golden.py --diff A.json B.json ...`` prints the largest difference per field.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smartsplit.config import load_config
from smartsplit.data.datasets import FASHION_MNIST_ROOT
from smartsplit.machine import kernel_fingerprint

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "shipped-configs.json"
SMALL = ["training.rounds=2", "fleet.devices=12", "training.devices_per_round=4", "training.local_steps=3",
         "data.test_limit=300", "data.train_limit=3000"]
STRATEGIES = ["fedavg", "fedavg-ckpt", "splitfed", "splitfed-v1", "splitfed-v2", "latency-only", "oort",
              "smartsplit-no-selection", "smartsplit-no-finetuning", "smartsplit-no-ckpt"]


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

    monkeypatch.setattr(experiment, "start_meter", lambda config: None)
    config = load_config(ROOT / "configs" / config_name, overrides)
    run_experiment(config, run_dir, progress=False)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        record.pop("wall_s", None)
    decisions = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    return {"overrides": overrides, "metrics": metrics, "decisions": decisions}


# Floats across kernel kinds: (relative, absolute) tolerance by field. Largest differences measured over every pair of
# the four kinds named in the module's docstring (``--diff``), in brackets:
# - figures the simulator computes in float64 from integer bytes and FLOPs and catalog figures (clock, latencies,
#   predicted times, penalties): only numpy's summation order differs [7e-16 relative];
# - what training produces: losses and the utilities made from them [1.1e-2 relative], test accuracy
#   [0.02 on 300 test examples; 0.05 on latency-vgg's 100], the MEC manager's unit importance, a statistic of
#   a few devices' updates [0.005; 0.09 on latency-vgg, where VGG-16 on 600 synthetic examples amplifies rounding].
CLOCK = (1e-9, 0.0)
CROSS_KIND = {"loss": (5e-2, 0.0), "loss_rms": (5e-2, 0.0), "statistical": (5e-2, 0.0), "utility": (5e-2, 0.0),
              "accuracy": (0.0, 0.05), "unit_importance": (0.0, 0.02)}
CROSS_KIND_BY_JOB = {"latency-vgg/smartsplit": {"accuracy": (0.0, 0.15), "unit_importance": (0.0, 0.3)}}


def tolerance(job: str, where: str) -> tuple[float, float]:
    """The cross-kind tolerance of the float at ``where`` (a path like ``metrics[1].devices[0].loss``)."""
    field = "unit_importance" if ".unit_importance." in where else where.rsplit(".", 1)[-1]
    return {**CROSS_KIND, **CROSS_KIND_BY_JOB.get(job, {})}.get(field, CLOCK)


def assert_same(got, want, exact: bool, where: str = "") -> None:
    """``got`` equals ``want``: bit for bit if ``exact``, else floats within ``tolerance`` and the rest exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], exact, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, exact, f"{where}[{i}]")
    elif isinstance(want, float) and not exact:
        rel, abs_ = tolerance(where.split(".", 1)[0], where)
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=rel, abs_tol=abs_), \
            f"{where}: {got!r} != {want!r} (cross-kind tolerance: relative {rel}, absolute {abs_})"
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


def assert_matches_golden(got: dict, golden: dict, key: str, fingerprint: dict) -> None:
    assert key in golden["runs"], f"{key}: no golden run; regenerate with `python tests/test_golden.py --write`"
    assert_same(got, golden["runs"][key], golden["fingerprint"] == fingerprint, key)


needs_data = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(),
                                reason="dataset-fashion-mnist is not installed (`bash scripts/install-data.sh`)")


@needs_data
@pytest.mark.parametrize("key,config_name,overrides", jobs(), ids=[key for key, _, _ in jobs()])
def test_shipped_configs_give_the_golden_metrics(key, config_name, overrides, tmp_path, monkeypatch):
    golden = json.loads(GOLDEN.read_text())
    got = run_small(config_name, overrides, tmp_path / "run", monkeypatch)
    assert_matches_golden(got, golden, key, kernel_fingerprint())


# One job per config, and the strategies whose floats reach their decisions by another path: under forced
# capabilities the golden file is compared across kinds (its fingerprint differs), never bit for bit.
FORCED_JOBS = [key for key, _, _ in jobs() if key.endswith("/smartsplit")] + ["fmnist/fedavg-ckpt", "fmnist/splitfed-v2"]


def forced_capabilities() -> list[str]:
    """The ATen capabilities this CPU can be forced to, other than the one it runs with."""
    import torch

    native = torch.backends.cpu.get_cpu_capability().lower()
    offered = ["default", "avx2"] if platform.machine() in ("x86_64", "AMD64") else ["default"]
    return [c for c in offered if c != native and (c != "avx2" or native == "avx512")]


@needs_data
def test_golden_runs_hold_under_forced_kernel_capabilities(tmp_path):
    capabilities = forced_capabilities()
    if not capabilities:
        pytest.skip(f"this CPU ({platform.machine()}) offers no other ATen capability to force")
    golden = json.loads(GOLDEN.read_text())
    procs = {}
    for capability in capabilities:  # side by side: one core each
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        procs[capability] = subprocess.Popen(
            [sys.executable, __file__, "--dump", str(tmp_path / f"{capability}.json"), "--jobs", ",".join(FORCED_JOBS)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for capability, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}: {output[-3000:]}"
        dump = json.loads((tmp_path / f"{capability}.json").read_text())
        assert dump["fingerprint"]["cpu_capability"].lower() == capability and dump["fingerprint"] != golden["fingerprint"]
        assert sorted(dump["runs"]) == sorted(FORCED_JOBS)
        for key, got in dump["runs"].items():
            assert_matches_golden(got, golden, key, dump["fingerprint"])


def dump_runs(path: Path, keys: list[str] | None = None) -> dict:
    """Run the golden jobs (``keys``: some of them) in this process and write them with its fingerprint."""
    import tempfile

    import torch

    class _Patch:
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    torch.set_num_threads(1)  # as the test session runs them (tests/conftest.py)
    runs = {}
    for key, name, overrides in jobs():
        if keys is None or key in keys:
            with tempfile.TemporaryDirectory() as d:
                runs[key] = run = run_small(name, overrides, Path(d) / "run", _Patch())
            print(key, [r["accuracy"] for r in run["metrics"]], flush=True)
    missing = set(keys or ()) - set(runs)
    if missing:
        raise SystemExit(f"no golden job named {sorted(missing)}")
    dump = {"fingerprint": kernel_fingerprint(), "runs": runs}
    path.write_text(json.dumps(dump, sort_keys=True))
    return dump


def _leaves(value, where=""):
    if isinstance(value, dict):
        for key, v in value.items():
            yield from _leaves(v, f"{where}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{where}[{i}]")
    else:
        yield where, value


def diff_dumps(paths: list[str]) -> None:
    """Print, per field, the largest difference between any two dumps, and every difference that is not a float."""
    dumps = {p: json.loads(Path(p).read_text())["runs"] for p in paths}
    largest: dict[str, tuple[float, float, str]] = {}
    for (pa, a), (pb, b) in itertools.combinations(dumps.items(), 2):
        for key in sorted(set(a) & set(b)):
            leaves_a, leaves_b = dict(_leaves(a[key])), dict(_leaves(b[key]))
            for where in sorted(set(leaves_a) | set(leaves_b)):
                x, y = leaves_a.get(where), leaves_b.get(where)
                field = re.sub(r"\[\d+\]", "[]", re.sub(r"unit_importance\.\d+", "unit_importance.*", where))
                if isinstance(x, float) and isinstance(y, float):
                    d = abs(x - y)
                    r = d / max(abs(x), abs(y)) if d else 0.0
                    old = largest.get(field, (0.0, 0.0, ""))
                    largest[field] = (max(old[0], r), max(old[1], d), f"{key} ({pa} / {pb})" if d > old[1] else old[2])
                elif x != y or type(x) is not type(y):
                    print(f"NOT A FLOAT: {key}{where}: {x!r} ({pa}) != {y!r} ({pb})")
    for field, (r, d, at) in sorted(largest.items(), key=lambda t: -t[1][0]):
        print(f"{field:55s} relative {r:.2e}  absolute {d:.2e}  {at}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="golden runs: write the file, dump this kind's runs, or diff dumps")
    parser.add_argument("--write", action="store_true", help=f"run every job and write {GOLDEN.name}")
    parser.add_argument("--dump", metavar="PATH", help="run the jobs and write them (with this process's fingerprint) to PATH")
    parser.add_argument("--jobs", help="comma-separated job keys for --dump (default: all)")
    parser.add_argument("--diff", nargs="+", metavar="DUMP", help="largest differences per field between dumps")
    args = parser.parse_args()
    if args.write:
        dump_runs(GOLDEN)
    elif args.dump:
        dump_runs(Path(args.dump), args.jobs.split(",") if args.jobs else None)
    elif args.diff:
        diff_dumps(args.diff)
    else:
        parser.print_help()
