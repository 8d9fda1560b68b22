"""Run folders: never overwritten or shared by accident, and resumed only into the run that was started there.

A run folder is refused when it already holds a run, unless the run is resumed or ``overwrite`` is asked for.
While a run writes, it holds an exclusive lock on ``RUN_DIR/.lock``: a second run into the same folder is
refused at once. Resume checks the saved state against the folder's config: the state records the resolved
config it was started with and the state format, and anything but a longer ``training.rounds`` is refused with
a line saying what differs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from smartsplit.config import Config
from smartsplit.errors import SmartSplitError

RUN_FILES = ("config.yaml", "metrics.jsonl", "decisions.jsonl", "state.pt", "summary.json", "model.pt")
STATE_FORMAT = 2  # bump when the state's layout changes; a state of another format is refused on resume


def check_writable(path: Path, what: str) -> None:
    """Refuse now, before any work, a folder the tool could not create or write into; make it if it is missing."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SmartSplitError(f"{what} {path}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SmartSplitError(f"{what} {path}: {probe} is not writable; choose another path")
    try:  # the only sure test is to make it (an empty folder is harmless)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmartSplitError(f"{what} {path}: cannot be created ({exc.strerror}); choose another path") from None


def run_folder(config: Config, run_dir: str | Path | None = None) -> Path:
    """Where ``config``'s run writes: ``run_dir``, or by default ``<output_dir>/<name>``."""
    return Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name


def check_run_folder(run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse a folder that cannot be written, or one that holds a run, unless resuming or overwriting it."""
    check_writable(run_dir, "run folder")
    if resume or overwrite or not run_dir.is_dir():
        return
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        raise SmartSplitError(
            f"run folder {run_dir} already holds a run ({', '.join(held)}): continue it with "
            f"`smartsplit run --resume {run_dir}`, give the run another name, or pass --overwrite to replace it"
        )


class RunLock:
    """An exclusive lock on a run folder for as long as a run writes into it (a no-op where ``fcntl`` is missing)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._file = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self._file = open(self.path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise SmartSplitError(f"run folder {self.path.parent}: another run is writing into it; wait for it to "
                                  "finish or give this run another name") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files (``--overwrite``), nothing else in the folder."""
    for name in (*RUN_FILES, "state.tmp"):
        (run_dir / name).unlink(missing_ok=True)


def fingerprint(config: Config) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the resolved config without its round count."""
    resolved = config.model_dump(mode="json")
    resolved["training"].pop("rounds")
    for where in ("engine", "workers", "ray_address"):  # they do not change results
        resolved.pop(where, None)
    return resolved


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')} {json.dumps(saved)} -> {json.dumps(now)}"]


def load_state(run_dir: Path, config: Config, records: int) -> dict | None:
    """The saved state of the run in ``run_dir``, checked against ``config``; None if the run has no finished
    round yet (it then starts from round 0). ``records``: rounds its metrics.jsonl holds."""
    import torch  # here, not above: the CLI checks a run folder before it imports torch

    path = run_dir / "state.pt"
    if not path.exists():
        if records:
            raise SmartSplitError(f"--resume {run_dir}: state.pt is missing but metrics.jsonl holds {records} rounds, "
                                  "so the run cannot continue exactly; start it again with --overwrite")
        return None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a truncated or foreign file
        raise SmartSplitError(f"--resume {run_dir}: state.pt cannot be read ({type(exc).__name__}); it is truncated "
                              "or not a SmartSplit state: start the run again with --overwrite") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise SmartSplitError(f"--resume {run_dir}: state.pt has state format {found}, this SmartSplit writes "
                              f"{STATE_FORMAT}; finish it with the version that started it, or start again with --overwrite")
    differences = _differences(state["config"], fingerprint(config))
    if differences:
        raise SmartSplitError(f"--resume {run_dir}: the config differs from the run that was started "
                              f"({'; '.join(differences)}); only training.rounds may change on resume: restore "
                              "config.yaml, or start a new run")
    if records < state["rounds_done"]:
        raise SmartSplitError(f"--resume {run_dir}: metrics.jsonl holds {records} rounds but state.pt is at round "
                              f"{state['rounds_done']}: the metrics of rounds {records + 1}..{state['rounds_done']} are "
                              "lost, so the run cannot continue consistently; start it again with --overwrite")
    if config.training.rounds < state["rounds_done"]:
        raise SmartSplitError(f"--resume {run_dir}: training.rounds is {config.training.rounds} but "
                              f"{state['rounds_done']} rounds are done; it can only be extended")
    return state
