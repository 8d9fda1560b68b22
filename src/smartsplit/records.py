"""What a run records: one report per device per round, one record per round (``metrics.jsonl``'s lines)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MB = 2**20  # the megabyte (MiB) every *_mb figure in records, configs and reports is counted in


@dataclass(frozen=True)
class DeviceReport:
    """What one device did in one round; the device sends it to the central server at the round's end."""

    device: int
    device_class: str
    cut: int  # the cut it was assigned
    final_cut: int  # where it ended (shallower if it handed units to the edge when squeezed)
    budget_mb: float  # the least memory it was allowed during the round
    peak_predicted_mb: float
    peak_measured_mb: float | None  # by the memory meter; None when nothing measured
    held_mb: float | None  # the most its role held at a step's end (weights, gradients, optimizer state), walked
    micro_batches: list[int]
    oom_events: int
    replans: int
    cut_moves: int
    pauses: int
    dropped_out: bool
    steps: int
    samples: int
    loss: float | None  # mean training loss over its steps
    loss_rms: float | None
    compute_s: float  # simulated seconds
    recompute_s: float
    comm_s: float
    wait_s: float  # queueing at the edge
    paused_s: float
    finish_s: float  # when it finished, seconds into the round
    bytes_up: int
    bytes_down: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out = {"device": out.pop("device"), "class": out.pop("device_class"), **out}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceReport:
        data = dict(data)
        data["device_class"] = data.pop("class", "")
        return cls(**_fill(cls, data))


@dataclass(frozen=True)
class RoundRecord:
    """One round: test accuracy after aggregation, what the round cost, and every device's report."""

    round: int
    accuracy: float | None  # of the global model on the test set after the round (None: not evaluated)
    loss: float | None
    participants: int
    excluded: int  # devices the strategy's memory rule kept out
    offline: int  # devices offline when the round started
    dropouts: int
    cuts: list[int]
    oom_events: int
    peak_predicted_mb: list[float]
    peak_measured_mb: list[float | None]
    peak_measured_by: str | None
    bytes_up: int
    bytes_down: int
    replans: int
    cut_moves: int
    pauses: int
    recompute_s: float
    recompute_pct: float
    unit_importance: dict | None
    mec_moves: dict | None
    latency_s: float  # simulated seconds of the round
    clock_s: float  # simulated seconds since the run started
    wall_s: float  # wall-clock seconds of the round (across processes when deployed)
    clock: str = "simulated"  # "measured": the round's times came from the wall clock (a free-running deployment)
    empty: str | None = None  # why nobody trained this round (None: somebody finished a step)
    idle_s: float = 0.0  # simulated seconds an empty round waited for a device to come online or a budget to change
    faults: dict[str, int] | None = None  # deployed runs: what went wrong this round, by kind (None: nothing)
    wire: dict[str, int] | None = None  # deployed runs: bytes that crossed device-edge links, by kind
    devices: list[DeviceReport] = field(default_factory=list)
    decision: dict = field(default_factory=dict, repr=False)  # who trained where and why: decisions.jsonl

    def to_json(self) -> dict[str, Any]:
        """The round's line of ``metrics.jsonl`` (the decision goes to ``decisions.jsonl``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "decision" and not (f.name in ("faults", "wire") and getattr(self, f.name) is None)}
        out["devices"] = [d.to_json() for d in self.devices]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        values = _fill(cls, data)
        values["decision"] = {}
        values["devices"] = [DeviceReport.from_json(d) for d in data.get("devices") or []]
        return cls(**values)


def _fill(cls, data: dict[str, Any]) -> dict[str, Any]:
    """``data``'s values for ``cls``'s fields; a field a file written by an older version lacks is 0, [] or None."""
    def default(annotation: str) -> Any:
        if annotation.startswith("list"):
            return []
        if "None" in annotation:
            return None
        return {"int": 0, "float": 0.0, "bool": False}.get(annotation)

    return {f.name: data[f.name] if f.name in data else default(str(f.type)) for f in fields(cls)}


def strict_json(value: Any, **options) -> str:
    """``value`` as strict JSON. JSON has no NaN or infinity: a non-finite number becomes null, and each mapping
    that held one (directly or in a list) names those keys under ``non_finite``."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {key: _finite(item) for key, item in value.items()}
        flagged = [key for key, item in value.items() if _holds_non_finite(item)]
        if flagged:
            out["non_finite"] = flagged
        return out
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _holds_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_holds_non_finite(item) for item in value)
    return False
