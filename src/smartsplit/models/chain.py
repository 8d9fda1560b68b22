"""Turn any ``nn.Module`` into a chain of units (an ``nn.Sequential``) by cutting its fx graph.

A cut is placed after a graph node wherever exactly one value is live across the boundary and
that value is a tensor: everything later depends on everything earlier only through it. Each unit
is a ``torch.fx.GraphModule`` holding its slice of the graph; the units share the original
model's submodules and parameters (no copies).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import fx, nn

from smartsplit.errors import SmartSplitError


class _Recorder(fx.Interpreter):
    """Runs the traced graph once, noting which nodes produce a tensor."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.is_tensor: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.is_tensor[n] = isinstance(out, torch.Tensor)
        return out


def _trace(model: nn.Module, label: str) -> fx.GraphModule:
    params = list(inspect.signature(model.forward).parameters.values())
    extra = params[1:]
    missing = [p.name for p in extra if p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not params or missing:
        raise SmartSplitError(
            f"model {label} must take exactly one tensor input to be split; forward() also needs "
            f"{missing}; pass an nn.Sequential of units instead"
        )
    concrete = {p.name: p.default for p in extra if p.default is not inspect.Parameter.empty}
    try:
        gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise SmartSplitError(
            f"model {label} could not be traced by torch.fx: {type(exc).__name__}: {exc}; "
            "pass an nn.Sequential of units instead"
        ) from exc
    # Arguments fixed to their defaults only feed fx's specialisation asserts: drop those nodes.
    extra_inputs = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    doomed: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n in extra_inputs or any(a in doomed for a in n.all_input_nodes):
            doomed.append(n)
    if any(n.op == "output" for n in doomed):
        raise SmartSplitError(
            f"model {label}: forward() uses more than one input; a chain needs exactly one tensor "
            "input; pass an nn.Sequential of units instead"
        )
    for n in reversed(doomed):
        gm.graph.erase_node(n)
    gm.recompile()
    return gm


def _run_eval(fn: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor) -> Any:
    """Run ``fn(x)`` in eval mode, without grad, from a fixed RNG seed; restore modes and RNG."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return fn(x.clone())
    finally:
        for m, mode in modes.items():
            m.training = mode


def _build_unit(gm: fx.GraphModule, nodes: list[fx.Node], src: fx.Node, out: Any, index: int) -> fx.GraphModule:
    """GraphModule computing ``out`` from ``src`` with ``nodes`` (get_attr nodes pulled in as needed)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {src: g.placeholder("x")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":  # liveness analysis guarantees this never happens
                raise AssertionError(f"node {n} is not available in unit {index}")
            env[n] = g.node_copy(n, lookup)
        return env[n]

    for n in nodes:
        env[n] = g.node_copy(n, lookup)
    g.output(fx.map_arg(out, lookup))
    g.lint()
    return fx.GraphModule(gm, g, class_name=f"Unit{index}")


def _find_cuts(gm: fx.GraphModule, is_tensor: dict[fx.Node, bool],
               label: str) -> tuple[list[fx.Node], list[tuple[int, fx.Node]]]:
    """The graph's nodes in order (get_attr and output left out) and the cuts: (position, value crossing) pairs.
    Raises :class:`SmartSplitError` if there is none."""
    graph_nodes = list(gm.graph.nodes)
    # get_attr nodes (parameters, buffers) are free: any unit may read them.
    order = [n for n in graph_nodes if n.op not in ("get_attr", "output")]
    pos = {n: i for i, n in enumerate(order)}
    end = len(order)  # position of the output node
    last_use = {n: max((end if u.op == "output" else pos.get(u, -1) for u in n.users), default=pos[n])
                for n in order}

    # Sweep: values live after position i are those defined at <= i and used at > i. Cut after i
    # when that is a single tensor produced since the previous cut (so no unit is an identity).
    cuts: list[tuple[int, fx.Node]] = []
    live: set[fx.Node] = set()
    for i, n in enumerate(order):
        live = {m for m in live if last_use[m] > i}
        if last_use[n] > i:
            live.add(n)
        if i < end - 1 and len(live) == 1:
            (v,) = live
            if pos[v] > (cuts[-1][0] if cuts else 0) and is_tensor.get(v, False):
                cuts.append((i, v))
    if not cuts:
        raise SmartSplitError(
            f"model {label} has no point where a single tensor crosses between layers, so it cannot "
            "be split into units; pass an nn.Sequential of units instead"
        )
    return order, cuts


def _build_chain(gm: fx.GraphModule, order: list[fx.Node], cuts: list[tuple[int, fx.Node]]) -> nn.Sequential:
    """The units between consecutive cuts, from the graph's input to its output, as an ``nn.Sequential``."""
    graph_nodes = list(gm.graph.nodes)
    placeholder = next(n for n in graph_nodes if n.op == "placeholder")
    output = next(n for n in graph_nodes if n.op == "output")
    units: list[nn.Module] = []
    assert order[0] is placeholder
    src, start = placeholder, 1
    for k, (i, v) in enumerate(cuts):
        units.append(_build_unit(gm, order[start:i + 1], src, v, k + 1))
        src, start = v, i + 1
    units.append(_build_unit(gm, order[start:], src, output.args[0], len(cuts) + 1))
    return nn.Sequential(*units)


def as_chain(model: nn.Module, example_input: torch.Tensor) -> nn.Sequential:
    """Return ``model`` as an ``nn.Sequential`` of one-tensor-in, one-tensor-out units.

    An ``nn.Sequential`` is returned unchanged. Other models are traced with ``torch.fx`` and cut at
    every point where a single tensor crosses; ``example_input`` (a batch) is run once in eval mode
    to tell tensors from other values and to check that the chain reproduces the model's output.
    Raises :class:`SmartSplitError` if the model cannot be traced or has no such cut.
    Units hold the model's own submodules and parameters. As with any fx trace, Python-level
    branches (e.g. on ``self.training``) are fixed at trace time.
    """
    if isinstance(model, nn.Sequential):
        return model
    label = type(model).__name__
    gm = _trace(model, label)
    rec = _Recorder(gm)
    reference = _run_eval(lambda x: rec.run(x), model, example_input)
    if not isinstance(reference, torch.Tensor):
        raise SmartSplitError(
            f"model {label} returns {type(reference).__name__}, not a single tensor; "
            "pass an nn.Sequential of units instead"
        )
    order, cuts = _find_cuts(gm, rec.is_tensor, label)
    chain = _build_chain(gm, order, cuts)

    result = _run_eval(chain, model, example_input)
    if not (isinstance(result, torch.Tensor) and result.shape == reference.shape
            and torch.allclose(result, reference, rtol=1e-4, atol=1e-5)):
        raise SmartSplitError(
            f"model {label}: the split chain does not reproduce the model's output; "
            "pass an nn.Sequential of units instead"
        )
    return chain
