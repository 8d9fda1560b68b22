"""What the memory meter measures, run inside its child process (``smartsplit.meter``): one steady-state
device step under a plan, and each unit alone (the figures the memory model composes).

A measured step is the device's side of ``kernels.step.reference_step``, one micro-batch loaded at a time; the edge is
not in the process, so the gradient of the cut activation comes back as a fresh tensor, as a link would deliver it.
"""

from __future__ import annotations

import gc
import pickle

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from smartsplit.kernels.step import backward_into, device_forward, make_optimizer
from smartsplit.kernels.structure import with_stand_ins
from smartsplit.meter.heap import Heap


def _units(blob: bytes):
    """The units sent to measure; a device's structure (no weights) gets stand-ins: memory does not depend on them."""
    return with_stand_ins(pickle.loads(blob))


def device_step(units, x, y, opt, micro_batch, segments, to_edge, returned_gen) -> None:
    """The device's side of a split step, as ``kernels.step.reference_step`` runs it, with one micro-batch loaded at
    a time; the edge's answer is a fresh gradient tensor."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    n = len(y)
    for start in range(0, n, micro_batch):
        xb = x[start : start + micro_batch].clone()
        activation = device_forward(units, xb, segments)
        if to_edge:
            returned = torch.randn(activation.shape, generator=returned_gen)
            backward_into(activation, returned)
            del returned
        else:
            loss = F.cross_entropy(activation, y[start : start + micro_batch], reduction="sum") / n
            loss.backward()
            del loss
        del activation, xb
    if opt is not None:
        opt.step()


def step_peak(heap: Heap, blob, input_shape, batch, micro_batch, segments, optimizer, num_classes, to_edge, warmup=1) -> int:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *input_shape), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    # Two steps of a throw-away copy first: what the process keeps after its first steps of a shape or a plan
    # (oneDNN's primitive cache, autograd's engine, and a one-time growth of about 2 MB seen with non-reentrant
    # checkpointing in its first few hundred calls) is the runtime's footprint, not the step's.
    units = _units(blob)
    opt = make_optimizer(list(units.parameters()), *optimizer)
    for _ in range(2):
        device_step(units, x, y, opt, micro_batch, segments, to_edge, g)
    del units, opt
    gc.collect()
    heap.settle()
    base = heap.live()
    units = _units(blob)
    opt = make_optimizer(list(units.parameters()), *optimizer)
    for _ in range(warmup):
        device_step(units, x, y, opt, micro_batch, segments, to_edge, g)
    gc.collect()
    heap.reset_peak()
    device_step(units, x, y, opt, micro_batch, segments, to_edge, g)
    peak = heap.peak() - base
    del units, opt
    return peak


def _exercise(u, x, opt, g) -> None:
    """Forward, backward and optimizer step of unit ``u`` on ``x``, twice (gradients from ``g``)."""
    for _ in range(2):
        out = u(x)
        backward_into(out, torch.randn(out.shape, generator=g))
        if opt is not None:
            opt.step()
        del out
        x.grad = None


def _settled_base(heap: Heap, unit_blob, x, g, optimizer) -> int:
    """Exercise a throw-away copy of the unit, so the runtime's one-time caches exist; the live heap after it."""
    spare = pickle.loads(unit_blob)
    _exercise(spare, x, make_optimizer(list(spare.parameters()), *optimizer), g)
    del spare
    gc.collect()
    heap.settle()
    return heap.live()


def _backward_peak(heap: Heap, u, x, g, at_cut: bool) -> int:
    """Highest heap during the backward of one forward of ``u``, above what was live just before it."""
    out = u(x)
    if at_cut:  # the output is the activation sent and the gradient comes from the caller: both stay
        top, grad = out, torch.randn(out.shape, generator=g)
    else:  # the gradient reaches the unit as the next unit would hand it over, made by autograd and let
        # go once used, with the output itself held only by what saved it
        top = out * 1.0
        grad = torch.randn(top.shape, generator=g)
    del out
    before = heap.live()
    heap.reset_peak()
    backward_into(top, grad)
    x.grad = None
    return heap.peak() - before


def _measure_unit(heap: Heap, u, x, opt, g, base: int) -> dict:
    """The figures of one unit ``u`` (with its optimizer ``opt``), above the settled heap ``base``; the caller
    holds ``u``, ``opt`` and ``x`` throughout."""
    _exercise(u, x, opt, g)  # as mid-training: optimizer state exists
    gc.collect()
    static = heap.live() - base
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    grads = static - (heap.live() - base)

    before = heap.live()
    heap.reset_peak()
    out = u(x)
    forward_peak, forward_kept = heap.peak() - before, heap.live() - before
    del out

    # each with no gradients yet (the first micro-batch), then with them (they accumulate)
    below_first, below_accumulating = _backward_peak(heap, u, x, g, False), _backward_peak(heap, u, x, g, False)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    at_cut_first, at_cut_accumulating = _backward_peak(heap, u, x, g, True), _backward_peak(heap, u, x, g, True)
    # checkpointed, the unit holds its graph and the checkpoint's own bookkeeping until its backward
    before = heap.live()
    out = checkpoint(u, x, use_reentrant=False)
    checkpoint_kept = heap.live() - before
    backward_into(out, torch.randn(out.shape, generator=g))
    del out
    x.grad = None
    before = heap.live()  # the gradients exist, as at the end of a step
    heap.reset_peak()
    if opt is not None:
        opt.step()
    optimizer_peak = heap.peak() - before
    return dict(static=static, grads=grads, forward_peak=forward_peak, forward_kept=forward_kept,
                backward_first=below_first, backward_accumulating=below_accumulating,
                backward_first_at_cut=at_cut_first, backward_accumulating_at_cut=at_cut_accumulating,
                checkpoint_kept=checkpoint_kept, optimizer_peak=optimizer_peak)


def unit_costs(heap: Heap, blob, input_shape, micro_batch, optimizer) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    units = _units(blob)
    h = torch.randn((micro_batch, *input_shape), generator=g)
    rows = []
    for index, unit in enumerate(units):
        unit_blob = pickle.dumps(unit)
        x = h.detach().requires_grad_(index > 0)  # in the chain, only the raw batch needs no gradient
        base = _settled_base(heap, unit_blob, x, g, optimizer)
        u = pickle.loads(unit_blob)
        opt = make_optimizer(list(u.parameters()), *optimizer)
        rows.append(_measure_unit(heap, u, x, opt, g, base))
        with torch.no_grad():
            h = u(h)
        del u, opt, x
    return rows
