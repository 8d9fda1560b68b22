"""No run lost or mixed, no resume into another run, no traceback for bad input, no silent mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from smartsplit.config import load_config
from smartsplit.errors import SmartSplitError
from smartsplit.runtime.embedded import resume_config, run_experiment
from smartsplit.runtime.folder import RunLock, check_run_folder
from test_config_cli import cli, write_config

ROUNDS = 2


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, Path]:
    """A finished tiny run (2 rounds): its config file and its run folder."""
    config = write_config(tmp_path, training={**yaml.safe_load(write_config(tmp_path).read_text())["training"], "rounds": ROUNDS})
    summary = run_experiment(load_config(config), progress=False)
    return config, Path(summary.run_dir)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- run folders


def test_a_finished_run_is_never_replaced_by_accident(finished, tmp_path: Path) -> None:
    config, run = finished
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SmartSplitError, match=r"already holds a run .*--resume.*--overwrite"):
        run_experiment(load_config(config), progress=False)
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched

    done = cli("run", str(config), "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "already holds a run" in done.stderr
    done = cli("compare", str(config), "--strategies", "fedavg", "--quiet", "--set", "name=tiny", cwd=tmp_path)
    assert done.returncode == 0  # compare's run folder is tiny-fedavg, not tiny
    again = cli("compare", str(config), "--strategies", "fedavg", "--quiet", "--set", "name=tiny", cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr

    replaced = run_experiment(load_config(config), progress=False, overwrite=True)
    assert metrics(run) == metrics(Path(replaced.run_dir)) and len(metrics(run)) == ROUNDS  # replaced, not appended


def test_overwrite_clears_every_file_of_the_old_run_before_the_new_one_writes(finished) -> None:
    """A run killed right after --overwrite started leaves no file of the run it replaced (the final model
    included), so the folder never mixes two runs."""
    from smartsplit.runtime.folder import RUN_FILES, clear_run

    _, run = finished
    assert all((run / name).exists() for name in RUN_FILES)
    (run / "notes.txt").write_text("mine")
    clear_run(run)  # what --overwrite does first
    assert not [name for name in RUN_FILES if (run / name).exists()] and (run / "notes.txt").read_text() == "mine"


def test_a_run_folder_is_locked_while_a_run_writes(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(SmartSplitError, match="another run is writing into it"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released when the first run ends
        pass


def test_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SmartSplitError, match="is a file, not a folder"):
        check_run_folder(a_file / "run")
    config = write_config(tmp_path, output_dir=str(a_file))
    done = cli("compare", str(config), "--strategies", "fedavg", "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr and not list(tmp_path.glob("**/metrics.jsonl"))
    done = cli("compare", str(write_config(tmp_path)), "--strategies", "fedavg", "--quiet", "--markdown",
               str(a_file / "table.md"), cwd=tmp_path)
    assert done.returncode == 2 and "--markdown" in done.stderr and not list(tmp_path.glob("runs/*/metrics.jsonl"))


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", ""])
def test_run_names_stay_inside_output_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(SmartSplitError, match="name: .*not a plain folder name|name: "):
        load_config(write_config(tmp_path), [f"name={json.dumps(name)}"])


# --------------------------------------------------------------------------- resume


def test_resume_refuses_another_run_and_says_what_differs(finished) -> None:
    _, run = finished
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["seed"], edited["data"]["alpha"] = 7, 0.3
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(SmartSplitError, match=r"differs .*data\.alpha 0\.5 -> 0\.3; seed 1 -> 7"):
        run_experiment(resume_config(run), run, progress=False, resume=True)


def test_resume_may_only_extend_rounds(finished, tmp_path: Path) -> None:
    config, run = finished
    with pytest.raises(SmartSplitError, match="only training.rounds may change"):
        resume_config(run, ["seed=3"])
    done = cli("run", str(config), "--resume", str(run), "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and "give no CONFIG" in done.stderr
    with pytest.raises(SmartSplitError, match="can only be extended"):
        run_experiment(resume_config(run, ["training.rounds=1"]), run, progress=False, resume=True)

    extended = run_experiment(resume_config(run, [f"training.rounds={ROUNDS + 1}"]), run, progress=False, resume=True)
    assert extended.rounds == ROUNDS + 1 and len(metrics(run)) == ROUNDS + 1
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["rounds"] == ROUNDS + 1
    # the extended run is the run that would have been made with 3 rounds from the start
    whole = run_experiment(load_config(config, [f"training.rounds={ROUNDS + 1}", "name=whole"]), progress=False)
    assert metrics(run) == metrics(Path(whole.run_dir))


@pytest.mark.parametrize("damage, message", [
    ("delete", "state.pt is missing"),
    ("truncate", "state.pt cannot be read"),
    ("empty", "state.pt cannot be read"),
    ("garbage", "state.pt cannot be read"),
    ("pickle", "state.pt cannot be read"),
    ("format", "state format 1"),
])
def test_every_resume_failure_is_one_clear_line(finished, tmp_path: Path, damage: str, message: str) -> None:
    _, run = finished
    state = run / "state.pt"
    if damage == "delete":
        state.unlink()
    elif damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "empty":
        state.write_bytes(b"")
    elif damage == "garbage":
        state.write_bytes(b"\x00not a state" * 50)
    elif damage == "pickle":  # a state that would run code when loaded without weights_only
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("this must never run",))

        state.write_bytes(pickle.dumps({"format": 2, "x": Evil()}))
    elif damage == "format":
        saved = torch.load(state, weights_only=True)
        torch.save({**saved, "format": 1}, state)
    done = cli("run", "--resume", str(run), "--quiet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1 and "this must never run" not in done.stdout


def test_state_is_plain_data(finished) -> None:
    _, run = finished
    state = torch.load(run / "state.pt", weights_only=True)  # would raise on any pickled object
    assert state["rounds_done"] == ROUNDS and set(state["strategy"]) == {"history", "importance", "mec"}


# --------------------------------------------------------------------------- user models and inputs


@pytest.mark.parametrize("factory, message", [
    ("user_models:raises", "the factory raised RuntimeError: broken factory"),
    ("user_models:needs_depth", "the factory needs depth"),
    ("user_models:NOT_CALLABLE", "is a int, not a function"),
    ("user_models:with_batch_norm", "uses BatchNorm"),
    ("user_models:functional_batch_norm", "its training forward changes the buffers mean, var"),
    ("user_models:wrong_channels", "does not run on"),
    ("user_models:wrong_width", "output is (2, 7)"),
])
def test_user_model_problems_are_named_before_round_one(tmp_path: Path, factory: str, message: str) -> None:
    config = write_config(tmp_path, model={"name": factory})
    done = cli("run", str(config), "--quiet", cwd=Path(__file__).resolve().parent)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "model.name" in done.stderr and not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


def test_a_user_model_whose_first_unit_has_no_parameters_trains_at_every_cut(tmp_path: Path) -> None:
    """At cut 1 such a device trains nothing and sends its input on: no traceback from a backward with no graph,
    with the meter off or on."""
    for meter in (False, True):
        config = write_config(tmp_path, model={"name": "user_models:reshapes_first"}, meter=meter,
                              strategy={"name": "splitfed-v2", "cut": 1})
        done = cli("run", str(config), "--quiet", "--overwrite", cwd=Path(__file__).resolve().parent)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed: "),
    ("training.devices_per_round=9", "devices_per_round (9) is more than fleet.devices (4)"),
    ("fleet.classes={mcu: 0.5}", "shares must sum to 1"),
])
def test_inconsistent_configs_are_refused(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(SmartSplitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write_config(tmp_path), [override])


def test_duplicate_keys_and_bad_numbers_on_the_command_line(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(SmartSplitError, match=r"line 2.*'seed' is given twice"):
        load_config(dup)
    config = write_config(tmp_path)
    for args, message in [(["--seeds", "0,a"], "--seeds"), (["--workers", "-3"], "--workers must be at least 1")]:
        done = cli("compare", str(config), "--strategies", "fedavg", *args, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_budget_trace_files_must_match_devices(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "device-0.csv").write_text("time_s,budget_mb\n0,4\n")
    (traces / "device-17.csv").write_text("time_s,budget_mb\n0,4\n")
    config = write_config(tmp_path, fleet={"devices": 4, "classes": {"wearable": 1.0},
                                           "budgets": {"kind": "csv", "csv_dir": str(traces)}})
    done = cli("run", str(config), "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and "device-17.csv matches no device" in done.stderr, done.stderr


def test_diverging_training_is_refused_not_aggregated_and_written_as_strict_json(tmp_path: Path, caplog) -> None:
    """A learning rate of 1e6: every update holds NaN. They are refused (counted, logged), the global model keeps
    its last finite weights, and metrics.jsonl stays strict JSON: non-finite numbers as null, their keys flagged."""
    config = write_config(tmp_path, training={**yaml.safe_load(write_config(tmp_path).read_text())["training"],
                                              "rounds": 2, "lr": 1e6}, strategy={"name": "fedavg"})
    summary = run_experiment(load_config(config), progress=False)
    run = Path(summary.run_dir)

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = [json.loads(line, parse_constant=strict) for line in (run / "metrics.jsonl").read_text().splitlines()]
    refused = [r["faults"]["non_finite_updates"] for r in lines if "non_finite_updates" in (r.get("faults") or {})]
    assert refused and sum(refused) >= len(lines)
    flagged = [d for r in lines for d in r["devices"] if d["loss"] is None and d["steps"]]
    assert flagged and all("loss" in d["non_finite"] for d in flagged)
    assert all(torch.isfinite(v).all() for v in torch.load(run / "model.pt", weights_only=True).values())
    assert "update(s) holding NaN or infinity" in caplog.text and "lower training.lr" in caplog.text
    json.loads((run / "summary.json").read_text(), parse_constant=strict)


def test_resume_after_a_kill_mid_write_reruns_that_round_and_a_lost_round_is_refused(finished, tmp_path: Path) -> None:
    """Killed while writing round 2's line (state.pt still at round 1): the half line is dropped and round 2 runs
    again, giving the uninterrupted run's metrics. Metrics missing rounds the state has passed cannot be made
    consistent: refused, naming both files."""
    import shutil

    config, run = finished
    whole = metrics(run)
    one = run_experiment(load_config(config, ["training.rounds=1"]), tmp_path / "one", progress=False)
    shutil.copy(Path(one.run_dir) / "state.pt", run / "state.pt")  # the state as it was after round 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # cut off mid-write
    resumed = run_experiment(resume_config(run), run, progress=False, resume=True)
    assert resumed.rounds == ROUNDS and metrics(run) == whole

    (run / "metrics.jsonl").write_text(lines[0] + "\n")  # round 2's line lost, but state.pt is at round 2
    with pytest.raises(SmartSplitError, match=r"metrics.jsonl holds 1 rounds but state.pt is at round 2"):
        run_experiment(resume_config(run), run, progress=False, resume=True)
    (run / "metrics.jsonl").write_text("not json\n" + "\n".join(lines) + "\n")  # damage that is not a cut-off line
    with pytest.raises(SmartSplitError, match="a line is not JSON"):
        run_experiment(resume_config(run), run, progress=False, resume=True)


def numpy_state_fedavg(config, num_units, seed):
        """A strategy of your own whose state holds numpy arrays and scalars."""
        import numpy as np

        from smartsplit.strategies.fixed_cut import fedavg

        base = fedavg(num_units)

        class Counting(type(base)):
            def __init__(self):
                self.__dict__.update(base.__dict__)
                self.seen = np.zeros(3)
                self.rounds = np.int64(0)

            def round_finished(self, rnd, reports, observations=None):
                self.seen = self.seen + len(reports)
                self.rounds = self.rounds + 1

            def state_dict(self):
                return {"seen": self.seen, "rounds": self.rounds, "pair": (np.float32(0.5), [np.arange(2)])}

            def load_state_dict(self, state):
                self.seen, self.rounds = state["seen"], state["rounds"]
                self.loaded = state

        return Counting()


def test_a_strategy_state_holding_numpy_round_trips_through_resume(tmp_path: Path) -> None:
    import numpy as np

    config = write_config(tmp_path, training={**yaml.safe_load(write_config(tmp_path).read_text())["training"],
                                              "rounds": 1}, strategy={"name": "test_hardening:numpy_state_fedavg"})
    run = Path(run_experiment(load_config(config), progress=False).run_dir)
    from smartsplit.engine.experiment import Experiment
    from smartsplit.runtime.folder import load_state

    experiment = Experiment(resume_config(run, ["training.rounds=2"]))
    state = load_state(run, resume_config(run, ["training.rounds=2"]), 1)  # no longer "cannot be read"
    experiment.load_state_dict(state)
    loaded = experiment.strategy.loaded
    assert isinstance(loaded["seen"], np.ndarray) and loaded["seen"].tolist() == [2.0, 2.0, 2.0]
    assert loaded["rounds"] == 1 and loaded["pair"][0] == 0.5 and loaded["pair"][1][0].tolist() == [0, 1]


# --------------------------------------------------------------------------- rounds nobody can train in


def _traces(folder: Path, header: str, rows: str, devices: int = 4) -> Path:
    folder.mkdir()
    for d in range(devices):
        (folder / f"device-{d}.csv").write_text(f"{header}\n{rows}")
    return folder


def test_a_fleet_offline_until_later_waits_for_it_and_the_empty_round_is_said(tmp_path: Path, caplog) -> None:
    """Every device offline until 100 s: round 1 trains nobody (recorded with its reason, warned, counted), the
    clock moves to 100 s, and round 2 trains."""
    online = _traces(tmp_path / "online", "time_s,online", "0,0\n100,1\n")
    config = write_config(tmp_path, training={**yaml.safe_load(write_config(tmp_path).read_text())["training"], "rounds": 2},
                          fleet={"devices": 4, "availability": {"kind": "csv", "csv_dir": str(online)}})
    summary = run_experiment(load_config(config), progress=False)
    first, second = metrics(Path(summary.run_dir))
    assert first["empty"] == "no device online (all 4 offline)" and first["participants"] == 0
    assert first["idle_s"] == 100.0 and first["clock_s"] == 100.0 and first["latency_s"] == 0.0
    assert second["empty"] is None and second["participants"] == 2 and second["clock_s"] > 100.0
    assert summary.empty_rounds == 1 and summary.stopped is None
    assert summary.simulated_time_s == pytest.approx(second["clock_s"])
    assert summary.peak_round_latency_s == second["latency_s"]  # an empty round is not a fast one
    assert "round 1 trained nobody: no device online" in caplog.text


@pytest.mark.parametrize("fleet, reason", [
    ({"availability": {"kind": "csv"}}, "no device online (all 4 offline)"),
    ({"budgets": {"kind": "csv"}}, "no online device picked: 4 of 4 excluded"),
])
def test_a_fleet_where_nobody_can_ever_train_ends_the_run_with_the_reason(tmp_path: Path, fleet: dict, reason: str) -> None:
    """All devices offline for good, or all budgets 0: the first round is recorded as empty, evaluated, and the
    run ends there with a clear message on the console (not a silent run of rounds without training)."""
    kind = next(iter(fleet))
    folder = _traces(tmp_path / kind, *(("time_s,online", "0,0\n") if kind == "availability" else ("time_s,budget_mb", "0,0\n")))
    fleet = {"devices": 4, kind: {**fleet[kind], "csv_dir": str(folder)}}
    config = write_config(tmp_path, fleet=fleet)  # 3 rounds
    done = cli("run", str(config), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nobody trained in 1 of the 1 rounds" in done.stdout
    assert "the run stopped early: no device can ever train" in done.stdout
    run = tmp_path / "runs" / "tiny"
    (only,) = metrics(run)
    assert only["empty"].startswith(reason) and only["accuracy"] is not None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["empty_rounds"] == 1 and summary["rounds"] == 1 and "fleet.availability or fleet.budgets" in summary["stopped"]


def test_what_a_device_holds_stays_inside_what_its_plan_predicted_while_budgets_move(tmp_path: Path) -> None:
    """Budgets that drop sharply just after the round starts move every device's cut up: the tensors a device role
    holds at its steps' ends (walked, not modelled) fit the peak its plans predicted."""
    traces = _traces(tmp_path / "budgets", "time_s,budget_mb", "0,10\n0.01,0.1\n")
    config = write_config(tmp_path, training={**yaml.safe_load(write_config(tmp_path).read_text())["training"],
                                              "rounds": 2, "local_steps": 4},
                          fleet={"devices": 4, "classes": {"wearable": 1.0}, "budgets": {"kind": "csv", "csv_dir": str(traces)}})
    summary = run_experiment(load_config(config), progress=False)
    devices = [d for r in metrics(Path(summary.run_dir)) for d in r["devices"] if d["steps"]]
    assert devices and any(d["cut_moves"] for d in devices)
    assert all(d["held_mb"] is not None and d["held_mb"] <= d["peak_predicted_mb"] for d in devices), devices
