"""What travels between the processes: the roles' messages as ``Payload``s (``smartsplit.proto``), never pickle.

A message's fields become JSON in which every tensor and numpy array is a reference into the payload's list of
raw-byte tensors (dtype, shape, bytes). Dicts keep their keys' types (unit indices are ints), tuples stay
tuples, and floats round-trip exactly. A body holds tensors, numbers, strings and the messages of
``smartsplit.messages`` (with the ``DeviceReport`` a result carries), each field checked against its declared
type as it is built: a peer can send data, never code, and never an object of its choosing.

Typed records that are not messages (a device's plan, the model's profile, budget and availability traces, the
fleet's devices) cross as plain data: the sender writes ``plain(record)``, and the receiver, which knows what
it expects there, builds ``typed(Record, data, what)`` on arrival, every field checked the same way.
Large payloads cross a stream as ``Frame`` chunks (``frames`` / ``Reassembly``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from typing import Any, Iterator, TypeVar, Union

import numpy as np
import torch

from smartsplit import messages
from smartsplit.deploy import smartsplit_pb2 as pb
from smartsplit.errors import SmartSplitError
from smartsplit.records import DeviceReport

CHUNK_BYTES = 1 << 20  # a stream frame's payload
MAX_DEPTH = 32  # nesting of a body's JSON (the deepest message nests about 8 levels)
MAX_BODY = 8 << 20  # characters of a body's JSON (tensors travel beside it, not in it)
WELCOME_BYTES = 1 << 30  # what an edge may send a device before it knows the model: its config, examples, trace
STREAM_LIMIT = 4 << 20  # the most one stream message may carry (a frame and its framing fit well within)
UNARY_LIMIT = 1 << 30  # the most a control-plane call may carry (a round's weights for an edge and its devices)

_MESSAGES = (messages.RoundInstructions, messages.EdgeInstructions, messages.Activation, messages.Gradient,
             messages.UnitHandoff, messages.Update, messages.DeviceResult, DeviceReport)
_TYPES = {cls.__name__: cls for cls in _MESSAGES}
T = TypeVar("T")
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
    """The payload's kind and value; anything malformed (too long, too deep, a tensor whose bytes do not match
    its declared shape and dtype, a type outside the messages) is a ``WireError``, never another exception."""
    kind = payload.kind[:40]
    if len(payload.body) > MAX_BODY:
        raise WireError(f"a {kind!r} message's body is {len(payload.body)} characters, over {MAX_BODY}")
    if _depth(payload.body) > MAX_DEPTH:
        raise WireError(f"a {kind!r} message nests deeper than {MAX_DEPTH} levels")
    try:
        return payload.kind, _decode(json.loads(payload.body), payload.tensors)
    except WireError:
        raise
    except Exception as exc:  # whatever a crafted body makes the decoder raise is the sender's fault
        raise WireError(f"a {kind!r} message could not be read ({type(exc).__name__}: {str(exc)[:200]}); "
                        "are both ends running the same SmartSplit version?") from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(body: str) -> int:
    """How deep the JSON ``body`` nests (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", body)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


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
        return typed(cls, {k: _decode(v, tensors) for k, v in value["fields"].items()}, f"a {cls.__name__}")
    raise WireError(f"unreadable value {str(value)[:80]}")


def plain(record: Any) -> dict[str, Any]:
    """A typed record (a frozen dataclass of numbers, strings, tensors and records) as plain data to send."""
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def typed(cls: type[T], data: Any, what: str) -> T:
    """``data`` a peer sent, built into the record ``cls``: exactly its fields, each of its declared type
    (recursively); anything else is a ``WireError`` naming ``what`` and the field."""
    if not isinstance(data, dict):
        raise WireError(f"{what}: expected the fields of a {cls.__name__}, got {type(data).__name__}")
    hints = _field_types(cls)
    unknown, missing = set(data) - set(hints), {n for n, f in _required(cls).items() if f} - set(data)
    if unknown or missing:
        raise WireError(f"{what}: a {cls.__name__} with unknown fields {sorted(map(str, unknown))} or missing "
                        f"{sorted(missing)}; are both ends running the same SmartSplit version?")
    values = {name: _as(hints[name], value, f"{what}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (SmartSplitError, ValueError, TypeError) as exc:
        raise WireError(f"{what}: not a valid {cls.__name__} ({exc})") from None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _required(cls: type) -> dict[str, bool]:
    return {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls) if f.init}


_ATOMS = {int: (int,), float: (int, float), str: (str,), bool: (bool,), torch.Tensor: (torch.Tensor,),
          np.ndarray: (np.ndarray,)}


def _as(tp: Any, value: Any, what: str) -> Any:
    """``value`` checked (and, for tuples and records, built) as type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is object or tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else typed(tp, value, what)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _as(next(a for a in args if a is not type(None)), value, what) if len(args) == 2 else value
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise WireError(f"{what}: expected a sequence, got {type(value).__name__}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise WireError(f"{what}: expected {len(args)} items, got {len(value)}")
            return tuple(_as(a, v, f"{what}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        items = [_as(args[0] if args else Any, v, f"{what}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{what}: expected a mapping, got {type(value).__name__}")
        key, item = args or (Any, Any)
        return {_as(key, k, f"{what} key"): _as(item, v, f"{what}[{k!r}]") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise WireError(f"{what}: {value!r} is not one of {args}")
        return value
    allowed = _ATOMS.get(tp)
    if allowed is None:
        raise WireError(f"{what}: a field of type {tp} cannot travel")
    if not isinstance(value, allowed) or (isinstance(value, bool) and tp is not bool):
        raise WireError(f"{what}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")
    return value


_NUMPY_DTYPES = {np.dtype(d).str: np.dtype(d) for d in (np.float64, np.float32, np.float16, np.int64, np.int32,
                                                          np.int16, np.int8, np.uint8, np.bool_)}


def _tensor(t: pb.Tensor) -> torch.Tensor | np.ndarray:
    """The tensor, once its declared shape and dtype account for its bytes exactly (checked before any buffer
    is made)."""
    shape = tuple(t.shape)
    if t.dtype.startswith("numpy:"):
        dtype = _NUMPY_DTYPES.get(t.dtype.removeprefix("numpy:"))
        itemsize = dtype.itemsize if dtype is not None else 0
    else:
        dtype = _TORCH_DTYPES.get(t.dtype)
        itemsize = dtype.itemsize if dtype is not None else 0
    if dtype is None:
        raise WireError(f"unknown tensor dtype {t.dtype[:40]!r}")
    if len(shape) > 8 or any(d < 0 for d in shape) or math.prod(shape) * itemsize != len(t.data):
        raise WireError(f"a tensor declared {t.dtype} {list(shape)[:9]} does not hold {len(t.data)} bytes")
    if isinstance(dtype, np.dtype):
        return np.frombuffer(t.data, dtype=dtype).reshape(shape).copy()
    if not t.data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(t.data), dtype=torch.uint8).view(dtype).reshape(shape)


def frames(payload: pb.Payload, chunk: int = CHUNK_BYTES) -> Iterator[pb.Frame]:
    """``payload`` serialized and cut into frames of at most ``chunk`` bytes."""
    data = payload.SerializeToString()
    for start in range(0, max(len(data), 1), chunk):
        yield pb.Frame(chunk=data[start : start + chunk], last=start + chunk >= len(data))


class Reassembly:
    """Collects frames until a payload is whole: ``add(frame)`` returns it then, else None. A message longer than
    ``limit`` bytes is a ``WireError`` as soon as its frames cross it (the receiver sets the limit from what it
    expects)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, frame: pb.Frame) -> pb.Payload | None:
        self._size += len(frame.chunk)
        if self._size > self.limit:
            self._parts, self._size = [], 0
            raise WireError(f"a message grew past {self.limit} bytes, the most this peer may send here")
        self._parts.append(frame.chunk)
        if not frame.last:
            return None
        data = b"".join(self._parts)
        self._parts, self._size = [], 0
        try:
            return pb.Payload.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, or worse
            raise WireError(f"a message is not a Payload ({type(exc).__name__})") from None
