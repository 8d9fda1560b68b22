"""How the engine executes a strategy's rounds: a small validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from smartsplit.errors import SmartSplitError

EdgeCopies = Literal["shared", "per-device"]
EdgeOrder = Literal["interleaved", "sequential"]


@dataclass(frozen=True)
class EngineOptions:
    """``edge_copies``: one server-side copy per edge server, trained on all its devices' steps ("shared"), or
    one per device, aggregated with the rest at the round's end ("per-device").
    ``edge_order``: devices' steps reach the edge in simulated arrival order ("interleaved"), or one device's
    whole round after another's ("sequential")."""

    edge_copies: EdgeCopies = "shared"
    edge_order: EdgeOrder = "interleaved"

    def __post_init__(self) -> None:
        for name, kind in (("edge_copies", EdgeCopies), ("edge_order", EdgeOrder)):
            value = getattr(self, name)
            if value not in get_args(kind):
                raise SmartSplitError(f"engine option {name}: {value!r} is not one of {', '.join(map(repr, get_args(kind)))}")
