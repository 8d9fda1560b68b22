"""Predicted device peak (DESIGN 3) against the peak measured on a real split training step.

For every zoo model, a few cuts and batch sizes: ``device_memory`` (SGD with momentum, one optimizer slot)
against what one real ``split_step`` holds on the device side. Then the same cut trained with the optimal
checkpoint plan for a budget of half the no-recompute activations: the predicted forward-held bytes
(``activation_peaks(...)[0]``) and recompute peaks against the measured ones.

Where it measures
  cpu  : saved-tensor hooks + live tensor bytes. Weights, grads and momentum are the live tensors after the
         step; the input is the real (micro-)batch; the activations are the bytes ``split_step`` really saved
         for backward (parameters and the input excluded, the cut activation discounted, as it does); the cut
         activation and the gradient returned for it are the real tensors (a forward hook on the last device
         unit and a gradient hook on what the edge received); the gradients in flight during backward come
         from the model (``in_flight_bytes``: the CPU allocator cannot be asked). With checkpointing, each
         recomputed segment's peak is measured by running that segment again on its real input under
         saved-tensor hooks, on top of what the forward held before it.
  cuda : the allocator: ``torch.cuda.max_memory_allocated`` around one real step (after a warm-up step, so the
         momentum buffers exist), device units and batch on the GPU, edge units on the host. With micro-batches
         the whole logical batch is staged on the GPU and the part beyond one micro-batch is subtracted.

Run: ``.venv/bin/python benchmarks/memory_model.py [--quick] [--models vgg16,resnet18] [--batches 8,32]``.
Exits 1 if any relative error exceeds ``--tolerance`` (default 10%).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from smartsplit.engine.step import split_step
from smartsplit.memory.measure import count_saved_bytes, tensor_bytes
from smartsplit.memory.model import activation_bytes, activation_peaks, device_memory, in_flight_bytes
from smartsplit.memory.planner import plan_segments
from smartsplit.models.profile import ModelProfile, ProfileCache
from smartsplit.models.zoo import MODELS, build_model, default_input_shape

MB = 2**20
SLOTS = 1  # SGD with momentum: one momentum buffer per parameter
LR, MOMENTUM = 0.01, 0.9


# ---------------------------------------------------------------------------------------------------------
# measuring one real step


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def add_device_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")


def device_from(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def measured_on(dev: torch.device) -> str:
    return "cuda (allocator)" if dev.type == "cuda" else "cpu (saved-tensor hooks + live tensor bytes)"


class _ToDevice(nn.Module):
    def __init__(self, dev: torch.device) -> None:
        super().__init__()
        self.dev = dev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dev)


class _ReturnedGradProbe(nn.Module):
    """First module of the edge: records the bytes of the gradient the edge returns for what it received."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_bytes = 0

    def forward(self, received: torch.Tensor) -> torch.Tensor:
        if received.requires_grad:
            received.register_hook(self._record)
        return received

    def _record(self, grad: torch.Tensor) -> None:
        self.grad_bytes = max(self.grad_bytes, grad.untyped_storage().nbytes())


@dataclass
class Measured:
    static: int  # weights + grads + optimizer state of the device units
    input: int  # the (micro-)batch
    held: int  # saved for backward at the end of the device forward (largest over micro-batches)
    recompute_peaks: tuple[int, ...]  # saved bytes held while each checkpointed segment is recomputed
    cut_io: int  # cut activation + its returned gradient
    in_flight: int  # from the model (cpu) or 0 (cuda: inside the allocator figure)
    allocator_peak: int | None = None  # cuda only

    @property
    def activations(self) -> int:
        return max((self.held, *self.recompute_peaks))

    @property
    def total(self) -> int:
        if self.allocator_peak is not None:
            return self.allocator_peak
        return self.static + self.input + self.activations + self.cut_io + self.in_flight


def static_bytes(units: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Weights, gradients and optimizer state of ``units``, from the live tensors."""
    params = list(units.parameters())
    owned = {id(p) for p in params}
    grads = [p.grad for p in params if p.grad is not None]
    state = []
    if opt is not None:
        for p, s in opt.state.items():
            if id(p) in owned:
                state += [t for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return tensor_bytes(params) + tensor_bytes(grads) + tensor_bytes(state)


def recompute_peaks(device_units: nn.Sequential, xb: torch.Tensor, segments) -> tuple[int, ...]:
    """Saved bytes held while each checkpointed segment is recomputed, measured with saved-tensor hooks.

    The forward runs as ``split_step`` runs it (kept units save, a checkpointed segment holds its input);
    at each segment the total held so far is noted, and the segment is run once with its saved tensors
    counted apart: that is what its recomputation saves, on top of what the units before it still hold.
    """
    if not segments:
        return ()
    params = list(device_units.parameters())
    ends = dict(segments)
    peaks = []
    with torch.enable_grad(), count_saved_bytes(exclude=[*params, xb]) as meter:
        h, l = xb, 1
        while l <= len(device_units):
            if l in ends:
                meter.add(h)
                before = meter.total
                last = ends[l]
                with count_saved_bytes(exclude=[*params, h, xb]) as seg:  # the inner hooks take precedence
                    out = device_units[l - 1 : last](h)
                if last == len(device_units):
                    seg.discount(out)  # the cut activation is counted with its gradient
                peaks.append(before + seg.total)
                h, l = out, last + 1
            else:
                h = device_units[l - 1](h)
                l += 1
    return tuple(peaks)


def measure_split(
    model: nn.Sequential,
    cut: int,
    x: torch.Tensor,
    y: torch.Tensor,
    profile_micro: ModelProfile,
    dev: torch.device,
    *,
    micro_batch: int | None = None,
    segments=(),
    steps: int = 1,
) -> tuple[Measured, list[float]]:
    """Train ``steps`` real split steps of ``model`` cut at ``cut`` and measure the device side's peak.

    ``model`` is copied; the original is left as it was. Returns the measurement and each step's wall time.
    """
    device_units = copy.deepcopy(model[:cut])
    edge_core = copy.deepcopy(model[cut:])
    probe = _ReturnedGradProbe()
    cut_act = [0]

    def record_activation(_module, _inputs, out):
        cut_act[0] = max(cut_act[0], out.untyped_storage().nbytes())

    m = micro_batch or len(y)
    if dev.type == "cuda":
        device_units = device_units.to(dev)
        x = x.to(dev)  # the whole logical batch is staged on the GPU; the part beyond one micro-batch is taken off below
        host = torch.device("cpu")
        edge = nn.Sequential(probe, _ToDevice(host), *edge_core) if len(edge_core) else nn.Sequential(probe)
        if not len(edge_core):
            y = y.to(dev)  # the loss is taken on the device's logits
    else:
        edge = nn.Sequential(probe, *edge_core)
    hook = device_units[-1].register_forward_hook(record_activation)
    dev_opt = torch.optim.SGD(device_units.parameters(), lr=LR, momentum=MOMENTUM)
    edge_params = list(edge_core.parameters())
    edge_opt = torch.optim.SGD(edge_params, lr=LR, momentum=MOMENTUM) if edge_params else None

    if dev.type == "cuda":
        steps = max(steps, 2)  # a warm-up step first: momentum buffers and library workspaces exist, as on a device mid-training
    times: list[float] = []
    held = 0
    allocator_peak = None
    for i in range(steps):
        if dev.type == "cuda" and i == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        result = split_step(device_units, edge, x, y, dev_opt, edge_opt, micro_batch=micro_batch, segments=tuple(segments))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        held = max(held, result.saved_bytes)
        if dev.type == "cuda" and i == steps - 1:
            # a real device loads one micro-batch at a time: the rest of the staged batch is not part of its peak
            staged_extra = (len(y) - m) * x[0].numel() * x.element_size()
            allocator_peak = torch.cuda.max_memory_allocated(dev) - staged_extra
    hook.remove()

    xb = x[:m].to(dev)
    peaks = recompute_peaks(device_units, xb, segments)
    measured = Measured(
        static=static_bytes(device_units, dev_opt),
        input=xb.numel() * xb.element_size(),
        held=held,
        recompute_peaks=peaks,
        cut_io=cut_act[0] + probe.grad_bytes,
        in_flight=0 if dev.type == "cuda" else in_flight_bytes(profile_micro, cut),
        allocator_peak=allocator_peak,
    )
    del device_units, edge, dev_opt, edge_opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return measured, times


def batch_for(shape: tuple[int, ...], batch: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=g), torch.randint(0, classes, (batch,), generator=g)


def rel_err(pred: int, meas: int) -> float:
    return (pred - meas) / meas if meas else 0.0


def cuts_for(num_units: int) -> list[int]:
    return sorted({1, max(1, num_units // 4), max(1, num_units // 2), num_units})


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    ap.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    ap.add_argument("--quick", action="store_true", help="batch 8 only, cuts 1, L/2 and L")
    ap.add_argument("--tolerance", type=float, default=0.10, help="largest relative error allowed")
    add_device_options(ap)
    args = ap.parse_args(argv)
    dev = device_from(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [8] if args.quick else [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()

    print(f"measured on: {measured_on(dev)}")
    print(f"optimizer: SGD momentum={MOMENTUM} (slots={SLOTS}); workspace term of the model: 0")
    if dev.type == "cpu":
        print("in-flight gradients: from the model (largest adjacent pair of unit outputs), not measured on cpu")
    cache = ProfileCache()
    plain_rows, ckpt_rows = [], []

    hdr = f"{'model':<12}{'cut':>4}/{'L':<3}{'batch':>6}{'predicted MB':>14}{'measured MB':>13}{'error':>9}   measured = static + input + activations + cut io + in-flight (MB)"
    print("\n== plain (no recompute) ==")
    print(hdr)
    for name in models:
        model = build_model(name)
        shape = default_input_shape(name)
        L = len(model)
        cuts = cuts_for(L)
        if args.quick:
            cuts = sorted({1, max(1, L // 2), L})
        for batch in batches:
            profile = cache.get(name, model, shape, batch)
            x, y = batch_for(shape, batch)
            for cut in cuts:
                pred = device_memory(profile, cut, slots=SLOTS)
                meas, _ = measure_split(model, cut, x, y, profile, dev)
                err = rel_err(pred.total, meas.total)
                plain_rows.append((name, cut, batch, err))
                parts = (
                    f"{meas.static / MB:.2f} + {meas.input / MB:.2f} + {meas.activations / MB:.2f} + "
                    f"{meas.cut_io / MB:.2f} + {meas.in_flight / MB:.2f}"
                    if dev.type == "cpu"
                    else f"allocator peak; saved by forward {meas.held / MB:.2f}"
                )
                print(
                    f"{name:<12}{cut:>4}/{L:<3}{batch:>6}{pred.total / MB:>14.3f}{meas.total / MB:>13.3f}"
                    f"{100 * err:>8.2f}%   {parts}",
                    flush=True,
                )

    print("\n== with checkpointing: budget = half the no-recompute activations, plan = plan_segments (optimal DP) ==")
    print(
        f"{'model':<12}{'cut':>4}/{'L':<3}{'batch':>6}  {'segments':<26}{'held pred':>10}{'held meas':>10}{'err':>8}"
        f"{'act pred':>10}{'act meas':>10}{'err':>8}{'total pred':>11}{'total meas':>11}{'err':>8}  (MB)"
    )
    for name in models:
        model = build_model(name)
        shape = default_input_shape(name)
        L = len(model)
        cuts = [c for c in cuts_for(L) if c > 1]
        if args.quick:
            cuts = sorted({max(2, L // 2), L})
        for batch in batches:
            profile = cache.get(name, model, shape, batch)
            x, y = batch_for(shape, batch)
            for cut in cuts:
                budget = activation_bytes(profile, cut) // 2
                plan = plan_segments(profile, cut, budget)
                if plan is None:
                    print(f"{name:<12}{cut:>4}/{L:<3}{batch:>6}  no segmentation fits half the activations")
                    continue
                segs = plan.segments
                pred_peaks = activation_peaks(profile, cut, segs)
                pred = device_memory(profile, cut, slots=SLOTS, segments=segs)
                meas, _ = measure_split(model, cut, x, y, profile, dev, segments=segs)
                e_held = rel_err(pred_peaks[0], meas.held)
                e_act = rel_err(max(pred_peaks), meas.activations)
                e_tot = rel_err(pred.total, meas.total)
                ckpt_rows.append((name, cut, batch, e_held, e_act, e_tot))
                seg_txt = ",".join(f"{a}-{b}" for a, b in segs)
                print(
                    f"{name:<12}{cut:>4}/{L:<3}{batch:>6}  {seg_txt:<26}{pred_peaks[0] / MB:>10.3f}{meas.held / MB:>10.3f}"
                    f"{100 * e_held:>7.2f}%{max(pred_peaks) / MB:>10.3f}{meas.activations / MB:>10.3f}{100 * e_act:>7.2f}%"
                    f"{pred.total / MB:>11.3f}{meas.total / MB:>11.3f}{100 * e_tot:>7.2f}%",
                    flush=True,
                )
                if max(pred_peaks) > budget:
                    print(f"    PLANNER: predicted activations {max(pred_peaks)} exceed the planning budget {budget}")

    max_plain = max((abs(r[3]) for r in plain_rows), default=0.0)
    max_ckpt = max((max(abs(r[3]), abs(r[4]), abs(r[5])) for r in ckpt_rows), default=0.0)
    worst = max(plain_rows, key=lambda r: abs(r[3]), default=None)
    print()
    print(f"rows: {len(plain_rows)} plain, {len(ckpt_rows)} checkpointed; wall time {time.perf_counter() - t_start:.1f}s")
    if worst:
        print(f"max |error| plain: {100 * max_plain:.2f}% ({worst[0]} cut {worst[1]} batch {worst[2]})")
    print(f"max |error| checkpointed (held, activations, total): {100 * max_ckpt:.2f}%")
    if dev.type == "cpu":
        print(
            "note: on cpu the profile and the measurement count bytes with the same saved-tensor hooks, so agreement "
            "checks that per-unit profiles compose (shared tensors, checkpointed segments, cut tensors) but not "
            "allocator rounding or library workspace; run on a GPU for the allocator check"
        )
    ok = max(max_plain, max_ckpt) <= args.tolerance
    print(f"within {100 * args.tolerance:.0f}% everywhere measured: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
