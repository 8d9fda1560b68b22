"""Your own models, strategies, data sets and partitioners, named in YAML as ``package.module:factory``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from smartsplit.errors import SmartSplitError


def is_plugin(name: str) -> bool:
    return ":" in name


def load_factory(field: str, spec: str) -> Callable:
    """The callable ``spec`` (``package.module:attribute``) names; ``field`` is the config field, for errors."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SmartSplitError(f"{field} {spec!r}: expected package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # an import runs the user's module: anything can go wrong there
        raise SmartSplitError(f"{field} {spec!r}: cannot import {attr!r} from {module_name!r} ({type(exc).__name__}: {exc})") from None
    if not callable(factory):
        raise SmartSplitError(f"{field} {spec!r}: {attr!r} is a {type(factory).__name__}, not a function or class")
    return factory


def call_factory(field: str, spec: str, factory: Callable, offered: dict[str, Any]) -> Any:
    """Call ``factory`` with those of ``offered`` it accepts (by name); it must give defaults to the rest."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    missing = [n for n, p in accepted.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and (n not in offered or offered[n] is None)]
    if missing:
        raise SmartSplitError(f"{field} {spec!r}: the factory needs {', '.join(missing)}, but SmartSplit can only "
                              f"pass {', '.join(offered)}; give the others defaults")
    kwargs = {k: v for k, v in offered.items() if (k in accepted or takes_any) and v is not None}
    try:
        return factory(**kwargs)
    except SmartSplitError:
        raise
    except Exception as exc:
        raise SmartSplitError(f"{field} {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None
