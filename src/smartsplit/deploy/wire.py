"""What travels between the processes: the roles' messages as ``Payload``s (``smartsplit.proto``), never pickle.

A message's fields become JSON in which every tensor and numpy array is a reference into the payload's list of
raw-byte tensors (dtype, shape, bytes). Dicts keep their keys' types (unit indices are ints), tuples stay
tuples, and floats round-trip exactly. A body can only build the dataclasses listed in ``_TYPES``: a peer can
send data, never code. Large payloads cross a stream as ``Frame`` chunks (``frames`` / ``Reassembly``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import numpy as np
import torch

from smartsplit.deploy import smartsplit_pb2 as pb
from smartsplit.strategies.options import EngineOptions
from smartsplit.errors import SmartSplitError
from smartsplit.fleet import AvailabilityTrace, BudgetTrace, Device
from smartsplit.fleet.clock import EdgeSpec
from smartsplit.memory.model import MemoryBreakdown
from smartsplit.memory.ondevice import DevicePlan
from smartsplit.meter.heap import UnitCost
from smartsplit.models.profile import ModelProfile, UnitProfile
from smartsplit.records import DeviceReport
from smartsplit.roles import messages
from smartsplit.roles.device import OptimizerSpec, SimulatedTimes, StepDone

CHUNK_BYTES = 1 << 20  # a stream frame's payload
STREAM_LIMIT = 4 << 20  # the most one stream message may carry (a frame and its framing fit well within)
UNARY_LIMIT = 1 << 30  # the most a control-plane call may carry (a round's weights for an edge and its devices)

_TYPES = {cls.__name__: cls for cls in (
    messages.RoundInstructions, messages.EdgeInstructions, messages.Activation, messages.Gradient,
    messages.UnitHandoff, messages.Update, messages.DeviceResult, DeviceReport, SimulatedTimes, StepDone,
    Device, BudgetTrace, AvailabilityTrace, EdgeSpec, EngineOptions, DevicePlan, MemoryBreakdown, ModelProfile,
    UnitProfile, UnitCost, OptimizerSpec,
)}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool,
)}


class WireError(SmartSplitError):
    """A payload this version of SmartSplit cannot read."""


def encode(kind: str, value: Any = None) -> pb.Payload:
    tensors: list[pb.Tensor] = []
    body = json.dumps(_encode(value, tensors), separators=(",", ":"))
    return pb.Payload(kind=kind, body=body, tensors=tensors)


def decode(payload: pb.Payload) -> tuple[str, Any]:
    try:
        return payload.kind, _decode(json.loads(payload.body), payload.tensors)
    except WireError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise WireError(f"a {payload.kind!r} message could not be read ({type(exc).__name__}: {exc}); "
                        "are both ends running the same SmartSplit version?") from None


def tensor_bytes(payload: pb.Payload) -> int:
    """Bytes of tensor data in ``payload``: what the simulator's byte accounting counts."""
    return sum(len(t.data) for t in payload.tensors)


def _encode(value: Any, tensors: list) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        tensors.append(pb.Tensor(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data=data))
        return {"$t": len(tensors) - 1}
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        tensors.append(pb.Tensor(dtype=f"numpy:{a.dtype.str}", shape=list(a.shape), data=a.tobytes()))
        return {"$t": len(tensors) - 1}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {"$map": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _TYPES and _TYPES[type(value).__name__] is type(value):
        return {"$dc": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value) if f.init}}
    raise WireError(f"{type(value).__name__} cannot travel between SmartSplit processes")


def _decode(value: Any, tensors) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$t" in value:
        return _tensor(tensors[value["$t"]])
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if "$map" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["$map"]}
    if "$dc" in value:
        cls = _TYPES.get(value["$dc"])
        if cls is None:
            raise WireError(f"unknown message type {value['$dc']!r}; are both ends running the same SmartSplit version?")
        return cls(**{k: _decode(v, tensors) for k, v in value["fields"].items()})
    raise WireError(f"unreadable value {str(value)[:80]}")


def _tensor(t: pb.Tensor) -> torch.Tensor | np.ndarray:
    shape = tuple(t.shape)
    if t.dtype.startswith("numpy:"):
        return np.frombuffer(t.data, dtype=np.dtype(t.dtype.removeprefix("numpy:"))).reshape(shape).copy()
    dtype = _TORCH_DTYPES.get(t.dtype)
    if dtype is None:
        raise WireError(f"unknown tensor dtype {t.dtype!r}")
    if not t.data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(t.data), dtype=torch.uint8).view(dtype).reshape(shape)


def frames(payload: pb.Payload, chunk: int = CHUNK_BYTES) -> Iterator[pb.Frame]:
    """``payload`` serialized and cut into frames of at most ``chunk`` bytes."""
    data = payload.SerializeToString()
    for start in range(0, max(len(data), 1), chunk):
        yield pb.Frame(chunk=data[start : start + chunk], last=start + chunk >= len(data))


class Reassembly:
    """Collects frames until a payload is whole: ``add(frame)`` returns it then, else None."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def add(self, frame: pb.Frame) -> pb.Payload | None:
        self._parts.append(frame.chunk)
        if not frame.last:
            return None
        payload = pb.Payload.FromString(b"".join(self._parts))
        self._parts = []
        return payload
